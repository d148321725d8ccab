"""bench/degraded_table.py: goal 3's table, and the rounds a run needs to reach FedAvg's ppl."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from degraded_table import rounds_to_fedavg, table  # noqa: E402


def run(variant, seed, ppl, curve, sets=("threads=1",)):
    return {"variant": variant, "seed": seed, "val_ppl": ppl, "ppl_curve": list(curve), "sets": [*sets, f"seed={seed}"],
            "ppl_vs_oracle": None, "clean_weight_spread": 1.0, "degraded_weight": 0.0}


def test_rounds_to_fedavgs_last_round_of_the_same_seed():
    fedavg0, fedavg1 = run("fedavg", 0, 190.0, [400, 250, 200]), run("fedavg", 1, 180.0, [400, 250, 150])
    robust = run("robust", 0, 140.0, [380, 199, 150])
    runs = [fedavg0, fedavg1, robust]
    assert rounds_to_fedavg(robust, runs) == 2  # 199 <= 200, in its second round
    assert rounds_to_fedavg(fedavg0, runs) == 3
    assert rounds_to_fedavg(run("robust", 1, 160.0, [380, 199, 160]), runs) is None  # seed 1's target is 150
    # overrides beyond the common ones pair a run with the FedAvg run of the same overrides only
    assert rounds_to_fedavg(run("robust", 0, 140.0, [100], sets=("threads=1", "federation.rounds=1")), runs) is None
    rows = table(runs).splitlines()
    assert rows[2] == "| fedavg | 0, 1 | 190.00 / 180.00 | - / - | 1.00 / 1.00 | 0.000 / 0.000 | 3 / 3 |"
    assert rows[3] == "| robust | 0 | 140.00 | - | 1.00 | 0.000 | 2 |"
