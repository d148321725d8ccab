"""bench/frontier_table.py: row labels and the bytes a run needed to reach fedavg-fp32's ppl."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from frontier_table import bytes_to_reach, label, table  # noqa: E402


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
