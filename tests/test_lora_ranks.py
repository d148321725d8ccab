"""Heterogeneous LoRA ranks per client (HetLoRA, skyfed.lora_ranks): truncation on the
downlink, zero-padding on the uplink, exact values and shapes, and a simulation with ranks
{8, 4, 2} across three clouds."""

from __future__ import annotations

import json

import pytest
import torch
from finetune_fixtures import PRETRAIN, pretrained  # noqa: F401  (a fixture)

from skyfed.compression.payload import decode_payload, encode_payload
from skyfed.compression.wire import TensorSpec
from skyfed.config import load_config
from skyfed.errors import ConfigError
from skyfed.federation.messages import ClientResult
from skyfed.federation.server import Rejection, ServerCore
from skyfed.federation.strategies import build_strategy
from skyfed.lora_exact import lora_layers
from skyfed.lora_ranks import pad_delta, truncate, truncated_spec
from skyfed.lora_server import LoraServer
from skyfed.model import build_model, federated_parameter_names, get_params

RANKS = {"aws": 8, "gcp": 4, "azure": 2}
CLIENTS_SET = "federation.clients=[{name: aws, lora_r: 8}, {name: gcp, lora_r: 4}, {name: azure, lora_r: 2}]"
A = "base_model.model.transformer.h.0.attn.c_attn.lora_A.default.weight"
B = "base_model.model.transformer.h.0.attn.c_attn.lora_B.default.weight"


def _cfg(*extra: str):
    return load_config(preset="smoke", overrides=["model.peft.method=lora", "model.peft.r=8", CLIENTS_SET, *extra])


def test_truncate_and_pad_values_and_shapes():
    a = torch.arange(8 * 3, dtype=torch.float32).reshape(8, 3)  # r x in
    b = torch.arange(5 * 8, dtype=torch.float32).reshape(5, 8)  # out x r
    small = truncate({A: a, B: b}, 2)
    assert torch.equal(small[A], a[:2]) and torch.equal(small[B], b[:, :2])
    spec = truncated_spec({A: TensorSpec((8, 3), torch.float32), B: TensorSpec((5, 8), torch.float32)}, 2)
    assert spec == {A: TensorSpec((2, 3), torch.float32), B: TensorSpec((5, 2), torch.float32)}
    # a rank-2 client ends at (a2, b2); zero-padded, its model is [a2; 0] and [b2, 0]
    a2, b2 = torch.full((2, 3), 7.0), torch.full((5, 2), -1.0)
    delta = {A: small[A] - a2, B: small[B] - b2}  # what it sends: global (truncated) - its model
    padded = pad_delta(delta, {A: a, B: b}, 2)
    assert padded[A].shape == (8, 3) and padded[B].shape == (5, 8)
    model_a, model_b = a - padded[A], b - padded[B]  # the model the server sees
    assert torch.equal(model_a, torch.cat([a2, torch.zeros(6, 3)])) and torch.equal(model_b, torch.cat([b2, torch.zeros(5, 6)], 1))
    assert torch.equal((model_b @ model_a), b2 @ a2)  # zero-padding keeps B_i A_i


def test_a_smaller_rank_client_starts_from_the_truncated_global_adapter_at_the_same_scaling():
    cfg = _cfg()
    server = build_model("gpt2-micro", 512, 0, seed=3, peft=cfg.model.peft)
    client = build_model("gpt2-micro", 512, 0, seed=3, peft=cfg.model.peft, lora_rank=2)
    names = federated_parameter_names(server)
    assert federated_parameter_names(client) == names
    full, small = get_params(server, names), get_params(client, names)
    assert small[A].shape == (2, 32) and small[B].shape == (96, 2)
    assert torch.equal(small[A], full[A][:2]) and torch.equal(small[B], full[B][:, :2])
    assert [l.scaling for l in lora_layers(client)] == [l.scaling for l in lora_layers(server)] == [2.0]
    assert client.peft_config["default"].r == 2


def test_the_server_truncates_tasks_and_averages_zero_padded_modules():
    cfg = _cfg()
    model = build_model("gpt2-micro", 512, 0, seed=3, peft=cfg.model.peft)
    strategy = build_strategy("fedavg", {})
    core = ServerCore(model, federated_parameter_names(model), strategy)
    core.lora = LoraServer(model, core.spec, strategy, cfg.compression, list(RANKS), {"gcp": 4, "azure": 2})
    g = torch.Generator().manual_seed(0)
    start = dict(core.params)
    sizes, ends = {}, {}
    for c, r in RANKS.items():
        task = core.task(c, 0, 1, {})
        sent, _ = decode_payload(task.payload, truncated_spec(core.spec, r))
        assert torch.equal(sent[A], start[A][:r]) and torch.equal(sent[B], start[B][:, :r])
        sizes[c] = len(task.payload)
        ends[c] = {n: t + torch.randn(t.shape, generator=g) for n, t in sent.items()}
    assert sizes["aws"] > sizes["gcp"] > sizes["azure"]  # the bytes shrink with the rank
    assert core.fp32_bytes("azure") == 4 * (2 * 32 + 96 * 2)
    agg = core.new_aggregate()
    tokens = {"aws": 100, "gcp": 200, "azure": 300}
    for c in RANKS:
        delta = {n: start[n][: RANKS[c]] - ends[c][n] if n == A else start[n][:, : RANKS[c]] - ends[c][n] for n in ends[c]}
        payload = encode_payload(delta, kind="update", round=0, client=c, base_version=0)
        got = core.accept(ClientResult(c, 0, 0, payload, tokens[c], 1.0), 0, 0)
        assert not isinstance(got, Rejection), got
        agg.add(got)
    core.publish(agg.result(core.params, 0))
    w = {c: t / 600 for c, t in tokens.items()}
    want_a = sum(w[c] * torch.cat([ends[c][A], torch.zeros(8 - RANKS[c], 32)]) for c in RANKS)
    want_b = sum(w[c] * torch.cat([ends[c][B], torch.zeros(96, 8 - RANKS[c])], 1) for c in RANKS)
    assert (core.params[A] - want_a).abs().max() <= 1e-6 and (core.params[B] - want_b).abs().max() <= 1e-6
    # a rank-2 update sent at the full rank is refused by its shape
    wrong = encode_payload({A: torch.zeros(8, 32), B: torch.zeros(96, 8)}, kind="update", round=1, client="azure", base_version=1)
    got = core.accept(ClientResult("azure", 1, 1, wrong, 10, 1.0), 1, 1)
    assert isinstance(got, Rejection) and "shape (8, 32), expected (2, 32)" in got.reason


def test_rank_options_are_checked():
    with pytest.raises(ConfigError, match="above model.peft.r=4"):
        load_config(preset="smoke", overrides=["model.peft.method=lora", "model.peft.r=4", CLIENTS_SET])
    with pytest.raises(ConfigError, match="needs model.peft"):
        load_config(preset="smoke", overrides=[CLIENTS_SET])
    with pytest.raises(ConfigError, match="secure_aggregation"):
        _cfg("security.secure_aggregation=true")
    cfg = load_config(preset="smoke", overrides=["model.peft.method=lora", "federation.num_clients=4",
                                                 "federation.clients=[{name: a, lora_r: 8}, {name: b, lora_r: 2}]"])
    assert [c.lora_r for c in cfg.federation.clients] == [8, 2, 8, 2]  # round-robin like the clouds


def test_a_simulation_with_ranks_8_4_2(pretrained, tmp_path):
    from skyfed.runtime.simulation import run_simulation

    cfg = _cfg("threads=1", f"model.path={pretrained / 'model'}", "train.lr=0.01", *PRETRAIN[3::2], "data.topics=[3]")
    run, summary = run_simulation(cfg, tmp_path / "run")
    rows = [json.loads(line) for line in (run.path / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(r["aggregated"] for r in rows)
    layers, width = 2, 256  # gpt2-tiny at width 256: c_attn is 256 -> 768
    fp32 = {c: 4 * layers * r * (width + 3 * width) for c, r in RANKS.items()}
    for row in rows:  # each client's adapter at its rank, plus the wire headers (about 660 bytes)
        for c, sent in [*row["bytes_up_by_client"].items(), *row["bytes_down_by_client"].items()]:
            assert fp32[c] <= sent <= fp32[c] + 1024, (c, sent)
        assert row["bytes_up_by_client"]["aws"] <= 1.02 * fp32["aws"]
        assert row["fp32_bytes_up"] == sum(fp32.values())
    from safetensors.torch import load_file

    adapter = load_file(str(run.path / "adapter" / "adapter_model.safetensors"))
    assert {tuple(t.shape) for t in adapter.values()} == {(8, width), (3 * width, 8)}  # the server's rank
    # the fine-tuning topic's perplexity falls below the pretrained model's on the same windows
    from test_finetune import _evaluate

    before = _evaluate(pretrained / "model", [*PRETRAIN[3::2], "data.topics=[3]"])
    assert summary["final"]["val_tokens"] == before.tokens
    assert summary["final"]["val_ppl"] < before.ppl, (summary["final"]["val_ppl"], before.ppl)


def test_clients_on_disk_with_ranks_and_exact_folding_equal_resident_clients(pretrained, tmp_path):
    """`simulation.client_state: disk` builds one model replica per LoRA rank and keeps each
    client's base weights (exact folding) in its state file: the run is bit-identical to
    resident clients, and each client's adapter travels at its own rank."""
    from skyfed.federation.checkpoint import load_checkpoint
    from skyfed.runtime.simulation import run_simulation

    timing = {"compute_s", "aggregate_s", "eval_s", "wall_time_s", "elapsed_s"}
    out = {}
    for where in ("memory", "disk"):
        cfg = _cfg("threads=1", f"model.path={pretrained / 'model'}", "train.lr=0.01", "model.peft.aggregation=exact",
                   *PRETRAIN[3::2], "data.topics=[3]", f"simulation.client_state={where}",
                   "clouds.aggregation_s=0.0")  # simulated times from the bytes and the model only
        run, summary = run_simulation(cfg, tmp_path / where)
        params, _ = load_checkpoint(run.path / "checkpoint")
        rows = [{k: v for k, v in json.loads(line).items() if k not in timing}
                for line in (run.path / "metrics.jsonl").read_text().splitlines()]
        out[where] = params, rows, summary["final"]
    (pm, rm, fm), (pd, rd, fd) = out["memory"], out["disk"]
    assert pm.keys() == pd.keys() and all(torch.equal(pm[n], pd[n]) for n in pm)
    assert rm == rd and len(rd) == 2 and fm == fd
    assert rd[0]["bytes_up_by_client"]["azure"] < rd[0]["bytes_up_by_client"]["gcp"] < rd[0]["bytes_up_by_client"]["aws"]
    files = {p.name for p in (tmp_path / "disk" / "clients").iterdir()}
    assert {"initial.safetensors", "initial-r4.safetensors", "initial-r2.safetensors"} <= files
