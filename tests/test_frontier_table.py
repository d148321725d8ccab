"""bench/frontier_table.py: row labels, the bytes a run needed to reach fedavg-fp32's ppl, and the
simulated time a slow-cloud run needed to reach FedAvg's."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from frontier_table import bytes_to_reach, label, table, time_table, time_to_reach  # noqa: E402


def entry(config, seed, ppl, sets=("threads=1",), baseline=None, curve=None, nbytes=1_000_000):
    e = {"config": f"configs/frontier/{config}.yaml", "seed": seed, "val_ppl": ppl, "sets": list(sets),
         "baseline": baseline, "bytes": nbytes, "current": True}
    if curve is not None:
        e["curve"] = curve
    return e


def test_bytes_to_reach_is_the_first_evaluated_round_at_or_below_the_reference_of_its_seed():
    runs = [entry("fedavg-fp32", 0, 150.0), entry("fedavg-fp32", 1, 140.0),
            entry("fedavg-fp32", 0, 100.0, baseline="sync"),
            entry("fedavg-fp32", 0, 90.0, sets=["threads=1", "federation.rounds=40"])]
    curve = [[49, 1_000, 200.0], [99, 2_000, 150.0], [149, 3_000, 120.0]]
    assert bytes_to_reach(entry("quality", 0, 110.0, curve=curve), runs) == 2_000  # 150 <= 150, seed 0's reference
    assert bytes_to_reach(entry("quality", 1, 110.0, curve=curve), runs) == 3_000  # seed 1's reference is 140
    assert bytes_to_reach(entry("quality", 1, 110.0, curve=curve[:2]), runs) is None  # never reached
    assert bytes_to_reach(entry("quality", 0, 110.0), runs) is None  # no curve recorded


def test_overrides_other_than_threads_make_their_own_row():
    runs = [entry("quality", 0, 120.0), entry("quality", 0, 110.0, sets=["threads=1", "compression.uplink=[]"])]
    assert [label(r) for r in runs] == ["quality", "quality --set compression.uplink=[]"]
    assert label(entry("fedavg-fp32", 0, 100.0, baseline="sync")) == "fedavg-fp32 --baseline sync"
    rows = table(runs).splitlines()[2:]
    assert len(rows) == 2 and rows[1].startswith("| quality --set compression.uplink=[] | 0 | 110.00 |")


def test_time_to_reach_is_timed_against_slow_cloud_fedavgs_last_evaluated_round():
    fedavg = entry("slow-cloud", 0, 146.0, curve=[[0, 10, 400.0, 2.0], [9, 100, 150.0, 20.0]])
    asynchronous = entry("async", 0, 140.0, curve=[[0, 5, 300.0, 0.5], [1, 10, 151.0, 3.0], [2, 15, 149.0, 6.0]])
    other_seed = entry("async", 1, 140.0, curve=[[0, 5, 100.0, 0.5]])
    old = entry("async", 0, 140.0, curve=[[0, 5, 100.0]])  # recorded before curves had the clock
    runs = [fedavg, asynchronous, other_seed, old]
    assert time_to_reach(asynchronous, runs) == 6.0  # first point at or below 150 (not the final 146)
    assert time_to_reach(fedavg, runs) == 20.0
    assert time_to_reach(other_seed, runs) is None  # no FedAvg of seed 1
    assert time_to_reach(old, runs) is None
    rows = time_table([fedavg, asynchronous]).splitlines()[2:]
    assert rows == ["| slow-cloud | 0 | 146.00 | 1.000 | 20.00 | 20.00 | 1.000 |",
                    "| async | 0 | 140.00 | 0.959 | 6.00 | 6.00 | 0.300 |"]
    assert "slow-cloud" not in table(runs) and "async" not in table(runs)  # not in the bytes table
