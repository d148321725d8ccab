"""Share of a federated round's wall time that is not local training.

    python bench/overhead.py                     # gpt2-tiny, 3 clients, 50 local steps, 4 rounds
    python bench/overhead.py --rounds 2 --out bench/results/overhead.json

Runs the real in-process simulation and splits each round's wall time into local
training (the clients' measured optimizer steps), evaluation of the global model, and
the rest: serialization of the model and updates, decoding and validation,
aggregation, checkpointing and bookkeeping. The first round is excluded (warm-up).
Goal (issue 2): framework overhead at most 5% of the round.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
from pathlib import Path

import torch

from skyfed.config import load_config
from skyfed.runtime.simulation import run_simulation


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--set", action="append", default=[], dest="overrides")
    ap.add_argument("--out", type=Path, default=Path("bench/results/overhead.json"))
    args = ap.parse_args(argv)
    cfg = load_config(overrides=[f"federation.rounds={args.rounds}", f"train.local_steps={args.steps}", *args.overrides])
    with tempfile.TemporaryDirectory() as tmp:
        run, summary = run_simulation(cfg, Path(tmp) / "run")
        rows = run.read_metrics()[1:]  # round 0 warms up caches and allocators
    shares = []
    for r in rows:
        train = sum(r["compute_s"].values())
        framework = r["wall_time_s"] - train - r["eval_s"]
        shares.append({
            "round": r["round"], "wall_s": r["wall_time_s"], "train_s": train, "eval_s": r["eval_s"],
            "aggregate_s": r["aggregate_s"], "framework_s": framework,
            "framework_share": framework / r["wall_time_s"], "eval_share": r["eval_s"] / r["wall_time_s"],
        })
    result = {
        "benchmark": "overhead",
        "command": "python bench/overhead.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": {"platform": platform.platform(), "torch": torch.__version__, "threads": torch.get_num_threads()},
        "model": cfg.model.preset, "clients": len(cfg.federation.clients), "local_steps": args.steps,
        "rounds_measured": len(shares),
        "median_framework_share": statistics.median(s["framework_share"] for s in shares),
        "median_eval_share": statistics.median(s["eval_share"] for s in shares),
        "median_not_training_share": statistics.median(s["framework_share"] + s["eval_share"] for s in shares),
        "bytes_per_client_round": rows[0]["bytes_up"] / len(rows[0]["bytes_up_by_client"]),
        "rounds": shares,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "rounds"}, indent=2))
    return result


if __name__ == "__main__":
    main()
