"""End to end: the CLI (simulation) and real gRPC processes with differential privacy on."""

from __future__ import annotations

import json
import math

from conftest import run_cli
from grpc_harness import SMOKE, client_args, free_port, metrics, server_args

from skyfed.security.accounting import epsilon


def _rows(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_client_level_dp_writes_epsilon_per_round_and_in_the_summary(tmp_path):
    run = tmp_path / "run"
    res = run_cli("run", "--preset", "smoke", "--set", "threads=1", "--set", "federation.rounds=3",
                  "--set", "security.dp.clip=0.5", "--set", "security.dp.noise_multiplier=1.2", "--out", str(run))
    assert res.returncode == 0, res.stderr
    rows = _rows(run)
    eps = [r["epsilon"] for r in rows]
    assert eps == [epsilon([(1.0, 1.2, r + 1)], 1e-5) for r in range(3)]  # every client every round: q = 1
    assert eps[0] < eps[1] < eps[2]
    assert all(r["weights"] == {"aws": 1 / 3, "gcp": 1 / 3, "azure": 1 / 3} for r in rows)
    assert all(math.isnan(v) for r in rows for v in r["train_loss"].values())  # no loss leaves a client
    summary = json.loads((run / "summary.json").read_text())
    assert summary["epsilon"] == eps[-1]
    assert summary["privacy"]["client"]["rounds"] == 3


def test_document_level_dp_sgd_reports_each_clouds_epsilon(tmp_path):
    run = tmp_path / "run"
    res = run_cli("run", "--preset", "smoke", "--set", "threads=1",
                  "--set", "security.dp.document.noise_multiplier=1.0", "--out", str(run))
    assert res.returncode == 0, res.stderr
    rows = _rows(run)
    for r in rows:
        assert set(r["epsilon_document"]) == {"aws", "gcp", "azure"}
        assert r["epsilon"] == max(r["epsilon_document"].values())
    summary = json.loads((run / "summary.json").read_text())
    doc = summary["privacy"]["document"]["aws"]
    assert doc["steps"] == 2 * 5  # two rounds of five local steps
    assert doc["epsilon"] == epsilon([(doc["sample_rate"], 1.0, 10)], 1e-5) == rows[-1]["epsilon_document"]["aws"]
    assert rows[0]["epsilon_document"]["aws"] < rows[1]["epsilon_document"]["aws"]


def test_distributed_noise_over_grpc(procs, tmp_path):
    """Real server and clients: the clients clip and add their noise shares; epsilon is reported."""
    port = free_port()
    run = tmp_path / "run"
    dp = ["--set", "security.dp.clip=0.5", "--set", "security.dp.noise_multiplier=1.0",
          "--set", "security.dp.noise=distributed", "--set", "federation.clients=[{name: aws}, {name: gcp}]"]
    procs.start("server", server_args([*SMOKE, *dp], port, None, run))
    for name in ["aws", "gcp"]:
        procs.start(name, client_args(name, port, None))
    assert procs.wait_exit("server", 300) == 0, procs.logs()
    rows = metrics(run)
    assert [r["epsilon"] for r in rows] == [epsilon([(1.0, 1.0, k)], 1e-5) for k in (1, 2)]
    assert all(r["aggregated"] and r["weights"] == {"aws": 0.5, "gcp": 0.5} for r in rows)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["epsilon"] == rows[-1]["epsilon"] and summary["privacy"]["client"]["noise"] == "distributed"
