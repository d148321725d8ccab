"""LoRA over gRPC: real server and client processes exchange only the adapter, and the
deployment's adapter equals a simulation's."""

from __future__ import annotations

import json

from finetune_fixtures import pretrained  # noqa: F401  (a fixture)
from grpc_harness import SMOKE, client_args, free_port, metrics, server_args
from safetensors.torch import load_file

from skyfed.config import load_config
from skyfed.runtime.simulation import run_simulation

CLIENTS = ["aws", "gcp", "azure"]


def test_lora_deployment_sends_only_the_adapter_and_matches_simulation(procs, pretrained, tmp_path):
    lora = [f"model.path={pretrained / 'model'}", "model.peft.method=lora", "model.peft.r=8", "train.lr=0.01"]
    cfg = [*SMOKE, *[x for item in lora for x in ("--set", item)]]
    port = free_port()
    run = tmp_path / "run"
    procs.start("server", server_args(cfg, port, None, run))
    for name in CLIENTS:
        procs.start(name, client_args(name, port, None))
    assert procs.wait_exit("server", 600) == 0, procs.logs()
    for name in CLIENTS:
        assert procs.wait_exit(name, 60) == 0, procs.logs()
    deployed = load_file(run / "adapter" / "adapter_model.safetensors")
    fp32 = sum(4 * t.numel() for t in deployed.values())
    rows = metrics(run)
    assert [r["round"] for r in rows] == [0, 1]
    for row in rows:
        assert all(fp32 <= b <= 1.02 * fp32 for b in row["bytes_up_by_client"].values()), row
    summary = json.loads((run / "summary.json").read_text())
    assert summary["total"]["bytes_up"] == sum(r["bytes_up"] for r in rows) <= 2 * 3 * 1.02 * fp32

    sim_run, _ = run_simulation(load_config(None, "smoke", ["threads=1", *lora]), tmp_path / "sim")
    simulated = load_file(sim_run.path / "adapter" / "adapter_model.safetensors")
    assert deployed.keys() == simulated.keys()
    for name, t in simulated.items():
        assert (deployed[name] - t).abs().max().item() <= 1e-5, name


def test_exact_lora_with_ranks_over_grpc_matches_simulation(procs, pretrained, tmp_path):
    """FedEx-LoRA's base weights' change travels in each task over gRPC (counted in
    bytes_down), and ranks {8, 4, 2} truncate and pad over the wire: the deployment's
    adapter and folded base layers equal a simulation's."""
    ranks = "federation.clients=[{name: aws, lora_r: 8}, {name: gcp, lora_r: 4}, {name: azure, lora_r: 2}]"
    lora = [f"model.path={pretrained / 'model'}", "model.peft.method=lora", "model.peft.r=8",
            "model.peft.aggregation=exact", "train.lr=0.01", ranks]
    cfg = [*SMOKE, *[x for item in lora for x in ("--set", item)]]
    port = free_port()
    run = tmp_path / "run"
    procs.start("server", server_args(cfg, port, None, run))
    for name in CLIENTS:
        procs.start(name, client_args(name, port, None))
    assert procs.wait_exit("server", 600) == 0, procs.logs()
    for name in CLIENTS:
        assert procs.wait_exit(name, 60) == 0, procs.logs()
    rows = metrics(run)
    assert [r["lora"]["base_kind"] for r in rows] == [{c: "none" for c in CLIENTS}, {c: "delta" for c in CLIENTS}]
    down = rows[1]["bytes_down_by_client"]
    assert rows[1]["lora"]["base_bytes_down"]["aws"] > down["aws"] / 2  # the residual's factors, in the task
    assert down["aws"] > down["gcp"] > down["azure"]  # the adapter shrinks with the rank
    summary = json.loads((run / "summary.json").read_text())
    assert summary["total"]["bytes_down"] == sum(r["bytes_down"] for r in rows)

    sim_run, _ = run_simulation(load_config(None, "smoke", ["threads=1", *lora]), tmp_path / "sim")
    sim_rows = [json.loads(line) for line in (sim_run.path / "metrics.jsonl").read_text().splitlines()]
    for sim_row, row in zip(sim_rows, rows):  # the same bytes, but for the digits of the headers' CRC-32s
        assert sim_row["bytes_down_by_client"].keys() == row["bytes_down_by_client"].keys()
        for c, sent in row["bytes_down_by_client"].items():
            assert abs(sim_row["bytes_down_by_client"][c] - sent) <= 16, (c, sent)
    for name in ("adapter_model.safetensors", "base_layers.safetensors"):
        deployed = load_file(run / "adapter" / name)
        simulated = load_file(sim_run.path / "adapter" / name)
        assert deployed.keys() == simulated.keys()
        for key, t in simulated.items():
            assert (deployed[key] - t).abs().max().item() <= 1e-5, (name, key)

    # the adapter on the pretrained model with the folded base layers is the merged model
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from skyfed.lora import load_folded_base

    merged = AutoModelForCausalLM.from_pretrained(str(run / "model")).eval()
    ids = torch.randint(0, 512, (2, 32), generator=torch.Generator().manual_seed(0))
    diffs = []
    for folded in (True, False):
        base = AutoModelForCausalLM.from_pretrained(str(pretrained / "model"))
        if folded:
            load_folded_base(base, run / "adapter")
        tuned = PeftModel.from_pretrained(base, str(run / "adapter")).eval()
        with torch.no_grad():
            diffs.append((merged(input_ids=ids).logits - tuned(input_ids=ids).logits).abs().max().item())
    assert diffs[0] < 1e-4 < 1e-2 < diffs[1], diffs
