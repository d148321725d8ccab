"""Secure aggregation over a real gRPC deployment: a `skyfed server` and `skyfed client`
processes on loopback (TLS and tokens), the control stages and the masked vectors
through the servicer's front door.

The clients run through tests/secagg_grpc_client.py: the real client, which also saves
the global model it received and its unmasked delta before masking (the reference the
secure sum must equal), logs the bytes of everything it pulls and pushes, and SIGKILLs
itself after set-up in the rounds it is told to (a dropout after masking).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from grpc_harness import SMOKE, client_args, dev_certs, free_port, metrics, server_args

from skyfed.config import load_config
from skyfed.runtime.simulation import run_simulation

SECURE = ["--set", "security.secure_aggregation=true", "--set", "security.secagg.bound=1.0"]
FIVE = ["aws", "gcp", "azure", "aws2", "gcp2"]
FIVE_CLIENTS = "federation.clients=[{name: aws}, {name: gcp}, {name: azure}, {name: aws2, cloud: aws}, {name: gcp2, cloud: gcp}]"


def start(procs, names: list[str], port: int, certs: dict, dump: Path, die: dict[str, str] | None = None) -> None:
    dump.mkdir(exist_ok=True)
    for name in names:
        env = {"SECAGG_DUMP": str(dump), "SECAGG_DIE_ROUNDS": (die or {}).get(name, "")}
        procs.start(name, client_args(name, port, certs), env=env, instrument="secagg_grpc_client")


def finished(run: Path) -> dict | None:
    try:
        return json.loads((run / "summary.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def dumped(dump: Path, name: str, round: int) -> dict:
    return torch.load(dump / f"{name}-r{round}.pt")


def token_weighted_mean(rows: list[dict]) -> dict[str, torch.Tensor]:
    total = sum(r["tokens"] for r in rows)
    return {k: sum(r["delta"][k].double() * r["tokens"] for r in rows) / total for k in rows[0]["delta"]}


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


def test_a_dropout_after_masking_gives_the_mean_of_the_others_and_too_many_are_refused(procs, tmp_path):
    """Five clients. Round 0: gcp2 dies after set-up; the new model is the global model
    minus the plain token-weighted mean of the other four deltas. Round 1: gcp2 is gone
    and azure and aws2 die after set-up; two of four survivors < threshold 3: the round
    is refused with one log line and the model stays bit for bit the same."""
    certs = dev_certs(tmp_path / "certs", FIVE)
    port, run, dump = free_port(), tmp_path / "run", tmp_path / "dump"
    # each of the three dropouts waits out one stage timeout; a survivor's smoke round takes seconds
    cfg = [*SMOKE, *SECURE, "--set", FIVE_CLIENTS, "--set", "federation.round_timeout_s=25", "--set", "federation.min_clients=2"]
    procs.start("server", server_args(cfg, port, certs, run))
    start(procs, FIVE, port, certs, dump, die={"gcp2": "0", "azure": "1", "aws2": "1"})
    procs.wait_for("the run's summary", lambda: finished(run) is not None, timeout=600)
    for name in ["aws", "gcp"]:
        assert procs.wait_exit(name, 120) == 0, procs.logs()
    for name in ["gcp2", "azure", "aws2"]:
        assert procs.wait_exit(name, 10) == -9  # SIGKILL, after it masked its update

    rows = metrics(run)
    assert [r["round"] for r in rows] == [0, 1]
    assert rows[0]["aggregated"] and rows[0]["secure_aggregation"] == {"survivors": ["aws", "aws2", "azure", "gcp"], "dropped": ["gcp2"]}
    assert rows[0]["missing"] == ["gcp2"]
    assert not rows[1]["aggregated"] and "threshold 3 not met" in rows[1]["aggregate_error"]
    assert sorted(rows[1]["missing"]) == ["aws2", "azure", "gcp2"]
    server_log = procs.log("server")
    assert server_log.count("secure aggregation refused") == 1, server_log[-3000:]
    assert "['gcp2'] did not answer the round 1 keys stage" in server_log

    # round 0: every client trained from the same global model g0; the secure sum of the four survivors
    r0 = {n: dumped(dump, n, 0) for n in FIVE}
    g0 = r0["aws"]["global"]
    assert all(max_diff(r0[n]["global"], g0) == 0 for n in FIVE)
    assert max(d.abs().max().item() for r in r0.values() for d in r["delta"].values()) < 1.0  # the clip bound: no clipping
    g1 = dumped(dump, "aws", 1)["global"]  # what the server published after round 0
    expected = {k: g0[k].double() - m for k, m in token_weighted_mean([r0[n] for n in ["aws", "gcp", "azure", "aws2"]]).items()}
    with_dead = {k: g0[k].double() - m for k, m in token_weighted_mean(list(r0.values())).items()}
    err = max_diff(g1, expected)
    assert err <= 1e-6, err  # fixed point (32-bit ring, bound 1: steps of 2.3e-9) and fp32 rounding
    assert max_diff(g1, with_dead) > 100 * 1e-6  # the check can fail: the dead client's delta would show

    # round 1 refused: the final model is bit for bit the model the clients received in round 1
    final = load_file(run / "model" / "model.safetensors")
    assert set(g1) <= set(final)
    for k, t in g1.items():
        assert final[k].dtype == t.dtype and final[k].numpy().tobytes() == t.numpy().tobytes(), k
    assert all(max_diff(dumped(dump, n, 1)["global"], g1) == 0 for n in ["gcp", "azure", "aws2"])


def wire_rows(dump: Path, names: list[str]) -> list[dict]:
    return [json.loads(line) for n in names for line in (dump / f"{n}-wire.jsonl").read_text().splitlines()]


def test_secure_deployment_ends_at_the_plain_perplexity_and_counts_its_control_bytes(procs, tmp_path):
    """Three clients, two rounds, secure aggregation over gRPC: the same model and
    perplexity as a plain simulation to fixed-point precision; summary.json's bytes are
    exactly what the clients pulled and pushed, masked vectors plus control messages."""
    names = ["aws", "gcp", "azure"]
    certs = dev_certs(tmp_path / "certs", names)
    port, run, dump = free_port(), tmp_path / "run", tmp_path / "dump"
    procs.start("server", server_args([*SMOKE, *SECURE], port, certs, run))
    start(procs, names, port, certs, dump)
    procs.wait_for("the run's summary", lambda: finished(run) is not None, timeout=480)
    for name in names:
        assert procs.wait_exit(name, 120) == 0, procs.logs()
    summary, rows = finished(run), metrics(run)
    assert all(r["aggregated"] and r["secure_aggregation"]["dropped"] == [] for r in rows)

    sim_run, sim_summary = run_simulation(load_config(None, "smoke", ["threads=1"]), tmp_path / "sim")
    assert summary["final"]["val_ppl"] == pytest.approx(sim_summary["final"]["val_ppl"], rel=1e-4)
    for a, b in zip(rows, metrics(sim_run.path)):
        assert a["val_loss"] == pytest.approx(b["val_loss"], abs=1e-4)
    deployed, simulated = load_file(run / "model" / "model.safetensors"), load_file(sim_run.path / "model" / "model.safetensors")
    assert max_diff(deployed, simulated) <= 1e-5

    wire = wire_rows(dump, names)
    up = [r for r in wire if r["dir"] == "up"]
    down = [r for r in wire if r["dir"] == "down"]
    masked = sum(r["payload"] for r in up if r["stage"] == "update")
    control_up = sum(r["payload"] for r in up if r["stage"] != "update")
    # control tasks' payloads, and the shares bundle a training task carries in its options
    control_down = sum(r["payload"] for r in down if r["stage"] != "update") + sum(r["options"] for r in down)
    models = sum(r["payload"] for r in down if r["stage"] == "update")
    assert sorted({r["stage"] for r in up}) == ["keys", "shares", "unmask", "update"] and len(up) == 3 * 2 * 4
    assert control_up > 2 * 3 * 1000  # keys, shares and unmask answers: about 1.7 KB per client and round
    assert summary["total"]["bytes_up"] == masked + control_up
    assert summary["total"]["bytes_down"] == models + control_down
    assert sum(r["secagg_bytes_up"] for r in rows) == control_up
    assert sum(r["secagg_bytes_down"] for r in rows) == control_down


def test_fedbuff_runs_one_secure_sum_per_buffer_over_grpc(procs, tmp_path):
    """FedBuff with secure aggregation through a real server: four clients, buffers of two,
    two rounds' budget: four buffers of two survivors each, every client in two of them,
    and summary.json's bytes are exactly what the clients pulled and pushed."""
    names = ["aws", "gcp", "azure", "aws2"]
    certs = dev_certs(tmp_path / "certs", names)
    port, run, dump = free_port(), tmp_path / "run", tmp_path / "dump"
    cfg = [*SMOKE, *SECURE, "--set", "federation.strategy.name=fedbuff", "--set", "federation.strategy.params={buffer_size: 2}",
           "--set", "federation.clients=[{name: aws}, {name: gcp}, {name: azure}, {name: aws2, cloud: aws}]",
           "--set", "federation.round_timeout_s=120"]
    procs.start("server", server_args(cfg, port, certs, run))
    start(procs, names, port, certs, dump)
    procs.wait_for("the run's summary", lambda: finished(run) is not None, timeout=480)
    for name in names:
        assert procs.wait_exit(name, 120) == 0, procs.logs()
    summary, rows = finished(run), metrics(run)
    assert [r["mode"] for r in rows] == ["async", "async"] and rows[-1]["updates"] == 8
    buffers = [b for r in rows for b in r["secure_aggregation"]]
    assert len(buffers) == 4 and all(len(b["survivors"]) == 2 and b["dropped"] == [] for b in buffers)
    assert sorted(c for b in buffers for c in b["survivors"]) == sorted(names * 2)
    assert len({b["task"] for b in buffers}) == 4  # each buffer its own session
    wire = wire_rows(dump, names)
    assert summary["total"]["bytes_up"] == sum(r["payload"] for r in wire if r["dir"] == "up")
    assert summary["total"]["bytes_down"] == sum(r["payload"] + r["options"] for r in wire if r["dir"] == "down")
    assert sum(r["secagg_bytes_up"] for r in rows) == sum(r["payload"] for r in wire if r["dir"] == "up" and r["stage"] != "update")
