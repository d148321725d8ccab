"""Compression through the engine: tampered updates never touch the model, the downlink's
bookkeeping matches what clients hold bit for bit, config forms, and a CLI smoke run."""

import json
import os
from dataclasses import replace

import pytest
import torch

import cli_forkserver

from skyfed.compression.chain import Chain
from skyfed.compression.channel import Downlink, DownlinkReceiver
from skyfed.compression.wire import pack, spec_of, unpack
from skyfed.config import load_config
from skyfed.errors import ConfigError, WireFormatError
from skyfed.federation.engine import Engine
from skyfed.federation.strategies import build_strategy
from skyfed.metrics import RunDir
from skyfed.model import federated_parameter_names
from skyfed.runtime.inprocess import InProcessTransport
from skyfed.runtime.setup import make_client, make_evaluator, new_model, prepare_data


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    path = os.environ.get("SKYFED_CACHE") or str(tmp_path_factory.mktemp("cache"))
    os.environ["SKYFED_CACHE"] = path
    return path


def _cfg(*overrides):
    return load_config(None, "smoke", ["federation.rounds=2", "threads=1", *overrides])


@pytest.fixture(scope="module")
def data(cache):
    return prepare_data(_cfg())


def _engine(cfg, data, tmp_path, tamper=None):
    device = torch.device("cpu")
    clients = [make_client(cfg, s.name, i, data.client_tokens[s.name], data.tokenizer, device) for i, s in enumerate(cfg.federation.clients)]
    if tamper is not None:
        victim = clients[0]
        honest = victim.handle
        victim.handle = lambda task: tamper(honest(task))
    model = new_model(cfg, data.tokenizer)
    evaluator = make_evaluator(cfg, data.valid.tokens[:2000], device)
    strategy = build_strategy(cfg.federation.strategy.name, cfg.federation.strategy.params)
    engine = Engine(cfg, InProcessTransport(clients), model, federated_parameter_names(model), strategy, evaluator, RunDir(tmp_path))
    return engine, clients


def _flip_byte(result):
    data = bytearray(result.payload)
    data[-10] ^= 0x55
    return replace(result, payload=bytes(data))


def _nan_values(result):
    parts, header = unpack(result.payload)
    name = next(k for k in parts if k.endswith(".scale"))
    parts[name] = parts[name].clone()
    parts[name][0] = float("nan")
    return replace(result, payload=pack(parts, header))


def _misshaped(result):
    parts, header = unpack(result.payload)
    name = next(k for k in parts if k.endswith(".q"))
    parts[name] = parts[name][:-1].clone()
    return replace(result, payload=pack(parts, header))


def _unknown_codec(result):
    parts, header = unpack(result.payload)
    header["codecs"][0]["name"] = "zip"
    return replace(result, payload=pack(parts, header))


def _truncated(result):
    return replace(result, payload=result.payload[: len(result.payload) // 2])


def _no_update(result):
    return replace(result, payload=None, error="dropped")


@pytest.mark.parametrize("tamper,reason", [
    (_flip_byte, "CRC-32"), (_nan_values, "scales must be finite"), (_misshaped, "encoded part 'q'"),
    (_unknown_codec, "unknown codec 'zip'"), (_truncated, "truncated"),
])
def test_tampered_update_is_rejected_and_others_are_aggregated(data, tmp_path, tamper, reason):
    cfg = _cfg("compression.uplink=[{name: topk, fraction: 0.2}, int8]")
    engine, _ = _engine(cfg, data, tmp_path / "a", tamper)
    before = {k: v.clone() for k, v in engine.params.items()}
    record = engine.run_round(0)
    assert list(record["rejected"]) == ["aws"] and reason in record["rejected"]["aws"]
    assert record["aggregated"] and "aws" not in record["bytes_up_by_client"]
    # the same round where aws sends nothing at all gives the same model, bit for bit
    ref, _ = _engine(cfg, data, tmp_path / "b", _no_update)
    ref.run_round(0)
    assert any(not torch.equal(before[k], engine.params[k]) for k in before)  # gcp + azure were applied
    for k in before:
        assert torch.equal(engine.params[k], ref.params[k])


def test_all_updates_tampered_leaves_model_untouched(data, tmp_path):
    cfg = _cfg("compression.uplink=[int8]", "federation.clients=[{name: aws}]")
    engine, _ = _engine(cfg, data, tmp_path, _nan_values)
    before = {k: v.clone() for k, v in engine.params.items()}
    record = engine.run_round(0)
    assert not record["aggregated"] and "NaN" in record["rejected"]["aws"] or "finite" in record["rejected"]["aws"]
    for k in before:
        assert torch.equal(engine.params[k], before[k])


@pytest.mark.parametrize("downlink", ["[{name: topk, fraction: 0.05}, int8]", "[{name: lowrank, rank: 2}, int8]"])
def test_lossy_downlink_bookkeeping_matches_clients_bit_for_bit(data, tmp_path, downlink):
    cfg = _cfg(f"compression.downlink={downlink}", "compression.uplink=[int8]", "federation.rounds=3")
    engine, clients = _engine(cfg, data, tmp_path)
    records = [engine.run_round(r) for r in range(3)]
    dl = engine.downlink
    for c in clients:
        held = dl.held[dl.client_tag[c.name]]
        assert c.downlink.tag == dl.client_tag[c.name]
        for k in held:
            assert torch.equal(c.downlink.held[k], held[k])
    fp32 = records[0]["fp32_bytes_down"]
    # deltas against the held models: ~3.8% of fp32 in tensor bytes (top-k; low rank: its
    # factors and the vectors), plus the (here large) headers of a micro model's many small
    # tensors; dense int8 alone would be > 25%
    assert all(r["bytes_down"] < 0.12 * fp32 for r in records)
    # the clients' models track the server's within the codec error, and do not drift
    err = max(float((dl.held[dl.client_tag["aws"]][k] - engine.params[k]).abs().max()) for k in held)
    assert err < 0.05


def test_downlink_refuses_delta_against_a_different_initial_model():
    spec = spec_of({"w": torch.zeros(10)})
    dl = Downlink(Chain.from_specs(["int8"]), spec)
    server = {"w": torch.arange(10, dtype=torch.float32)}
    ok = DownlinkReceiver({"w": server["w"].clone()})
    other = DownlinkReceiver({"w": server["w"] + 1})
    payload = dl.payload_for("ok", server, 0, 0)
    assert dl.payload_for("other", server, 0, 0) is payload  # one encoding per client state
    assert torch.equal(ok.receive(payload, spec, None)["w"], server["w"])
    with pytest.raises(WireFormatError, match="initial model differs"):
        other.receive(payload, spec, None)
    dl.settle(["ok", "other"], ["ok"])
    nxt = {"w": server["w"] * 2}
    full = dl.payload_for("other", nxt, 1, 1)
    assert unpack(full)[1]["kind"] == "model"
    got = other.receive(full, spec, None)
    assert float((got["w"] - nxt["w"]).abs().max()) <= 18 / 254 + 1e-6
    late = DownlinkReceiver({"w": server["w"].clone()})  # not selected in round 0
    late_payload = dl.payload_for("late", nxt, 1, 1)
    assert unpack(late_payload)[1]["base_tag"] == 0  # still a delta against the initial model
    assert torch.equal(late.receive(late_payload, spec, None)["w"], dl.held[dl.client_tag["late"]]["w"])
    delta = dl.payload_for("ok", nxt, 1, 1)
    assert unpack(delta)[1]["kind"] == "model_delta"
    assert torch.equal(ok.receive(delta, spec, None)["w"], dl.held[dl.client_tag["ok"]]["w"])


def test_config_accepts_short_and_long_codec_forms():
    cfg = load_config(None, "smoke", ["compression.uplink=[int8]", "compression.downlink=[{name: topk, fraction: 0.1}, int4]"])
    assert cfg.compression.uplink == [{"name": "int8", "block": 256, "stochastic": False, "seed": 0}]
    assert [c["name"] for c in cfg.compression.downlink] == ["topk", "int4"]
    assert cfg.compression.error_feedback and cfg.compression.downlink_delta
    with pytest.raises(ConfigError, match="compression.uplink.*unknown codec 'int7'"):
        load_config(None, "smoke", ["compression.uplink=[int7]"])
    with pytest.raises(ConfigError, match="topk.fraction must be"):
        load_config(None, "smoke", ["compression.uplink=[{name: topk, fraction: 2}]"])


def test_cli_smoke_run_with_int8_uplink_converges_with_fewer_bytes(cache, tmp_path):
    out = tmp_path / "run"
    proc = cli_forkserver.run(
        ["run", "--preset", "smoke", "-q", "--out", str(out),
         "--set", "compression.uplink=[int8]", "--set", "federation.rounds=3", "--set", "threads=1"],
        dict(os.environ), timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["val_loss"] for r in rows]
    assert losses == sorted(losses, reverse=True) and summary["final"]["val_ppl"] < 0.9 * 512  # vocab 512: chance ppl
    assert all(r["rejected"] == {} for r in rows)
    ratio = summary["total"]["compression_ratio_up"]
    assert 3.5 < ratio < 4.0  # int8: ~1.016 bytes per value + headers, vs 4
    assert summary["total"]["bytes_up"] < 0.3 * summary["total"]["bytes_down"]  # downlink stays fp32
