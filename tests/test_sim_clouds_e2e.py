"""End to end through the CLI: a three-cloud run where one cloud is 4x slower, scripted
outages, a round deadline, the egress bill and partition.json in the run directory."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

import cli_forkserver

PRICES = {"fast1": 0.09, "fast2": 0.12, "slow": 0.087}
CLOUDS = {
    "server": "hub",
    "profiles": {
        "hub": {"egress_usd_per_gb": 0.05, "uplink_mbps": 1000, "downlink_mbps": 1000},
        "fast1": {"tokens_per_s": 2000, "egress_usd_per_gb": PRICES["fast1"], "uplink_mbps": 100, "downlink_mbps": 100, "rtt_ms": 20},
        "fast2": {"tokens_per_s": 2000, "egress_usd_per_gb": PRICES["fast2"], "uplink_mbps": 100, "downlink_mbps": 100, "rtt_ms": 20},
        "slow": {"tokens_per_s": 500, "egress_usd_per_gb": PRICES["slow"], "uplink_mbps": 100, "downlink_mbps": 100, "rtt_ms": 20},
    },
}
CLIENTS = [{"name": "a", "cloud": "fast1"}, {"name": "b", "cloud": "fast2"}, {"name": "c", "cloud": "slow"}]


def run_cli(tmp: Path, name: str, extra: dict) -> tuple[list[dict], dict, Path, str]:
    cfg = {"clouds": {**CLOUDS, **extra.pop("clouds", {})}, "federation": {"clients": CLIENTS, **extra.pop("federation", {})}}
    cfg.update(extra)
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = tmp / name
    proc = cli_forkserver.run(
        ["run", str(path), "--preset", "smoke", "--quiet", "--out", str(out)],
        dict(os.environ), timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    return rows, json.loads((out / "summary.json").read_text()), out, proc.stderr


@pytest.fixture(scope="module")
def slow_run(tmp_path_factory):
    return run_cli(tmp_path_factory.mktemp("clouds"), "slow", {})


def test_sync_rounds_are_bounded_by_the_slow_cloud(slow_run):
    rows, summary, _, _ = slow_run
    for row in rows:
        timing = row["client_timing"]
        assert set(timing) == {"a", "b", "c"} and row["slowest_client"] == "c"
        assert timing["c"]["compute_s"] == pytest.approx(4 * timing["a"]["compute_s"])
        slowest = max(t["total_s"] for t in timing.values())
        assert slowest == pytest.approx(timing["c"]["total_s"])
        assert row["round_sim_s"] == pytest.approx(slowest + row["aggregate_s"], abs=1e-9)
        # smoke: 5 steps x 4 x 32 tokens at 500 tokens/s
        assert timing["c"]["compute_s"] == pytest.approx(5 * 4 * 32 / 500)
    assert rows[-1]["sim_time_s"] == pytest.approx(sum(r["round_sim_s"] for r in rows))
    assert summary["sim_time_s"] == pytest.approx(rows[-1]["sim_time_s"])


def test_egress_bill_is_bytes_times_price_per_cloud(slow_run):
    rows, summary, _, _ = slow_run
    up = {c: sum(r["bytes_up_by_client"][c] for r in rows) for c in "abc"}
    down = sum(sum(r["bytes_down_by_client"].values()) for r in rows)
    expected = {
        "hub": down * 0.05 / 1e9,
        "fast1": up["a"] * PRICES["fast1"] / 1e9,
        "fast2": up["b"] * PRICES["fast2"] / 1e9,
        "slow": up["c"] * PRICES["slow"] / 1e9,
    }
    bill = summary["egress_cost_usd"]
    for cloud, usd in expected.items():
        assert round(bill[cloud], 2) == round(usd, 2)
        assert bill[cloud] == pytest.approx(usd, rel=1e-12)
    assert bill["total"] == pytest.approx(sum(expected.values()), rel=1e-12)
    assert rows[-1]["egress_cost_usd"] == bill


def test_partition_stats_are_in_the_run_directory(slow_run):
    _, summary, out, _ = slow_run
    stats = json.loads((out / "partition.json").read_text())
    assert set(stats["clients"]) == {"a", "b", "c"}
    assert {c: v["tokens"] for c, v in stats["clients"].items()} == summary["client_tokens"]


def test_outage_and_deadline(tmp_path):
    rows, summary, _, stderr = run_cli(tmp_path, "outage", {
        "clouds": {"outages": ["fast2:0-0"]},
        # a and b take ~0.36 s a round, c ~1.32 s (4x slower compute): a 0.6 s deadline drops c
        "federation": {"rounds": 2, "round_timeout_s": 0.6},
    })
    assert len(rows) == 2 and summary["rounds"] == 2  # the run finishes
    assert [r["unreachable"] for r in rows] == [["b"], []]
    assert [r["missing"] for r in rows] == [["b", "c"], ["c"]]
    assert "b" not in rows[0]["bytes_down_by_client"]  # nothing was sent to the cloud that was down
    assert "round 0: b is unreachable: scripted outage of fast2 in rounds 0-0" in stderr
    assert "round 0: no update from c" in stderr  # late: dropped at the deadline
    assert all(r["aggregated"] for r in rows)
    assert rows[0]["round_sim_s"] == pytest.approx(0.6 + rows[0]["aggregate_s"], abs=1e-9)
    assert "c" not in rows[0]["client_timing"]


def test_partition_command_writes_shards_report_and_plot(tmp_path):
    import numpy as np

    out = tmp_path / "part"
    proc = cli_forkserver.run(
        ["partition", "--preset", "smoke", "--out", str(out),
         "--set", "data.partition.method=quantity", "--set", "data.partition.shares=[1, 1, 2]"],
        dict(os.environ), timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "partition: quantity" in proc.stdout and "azure" in proc.stdout
    stats = json.loads((out / "partition.json").read_text())
    docs = np.concatenate([np.load(out / f"{c}.docs.npy") for c in ("aws", "gcp", "azure")])
    assert sorted(docs.tolist()) == list(range(stats["total_docs"]))
    tokens = {c: len(np.load(out / f"{c}.tokens.npy")) for c in ("aws", "gcp", "azure")}
    assert tokens == {c: v["tokens"] for c, v in stats["clients"].items()}
    assert sum(tokens.values()) == stats["total_tokens"]
    assert (out / "partition.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
