"""The same experiment under `runtime: inprocess` and `runtime: ray`: are the results equal?

    PYTHONPATH=src python bench/ray_equivalence.py                      # the default experiment
    PYTHONPATH=src python bench/ray_equivalence.py --preset smoke --set federation.strategy.name=fedadam
    PYTHONPATH=src python bench/ray_equivalence.py --index-only   # rewrite the file's top-level command

Both runs use one torch thread (a Ray actor's computation then matches the in-process
one bit for bit: see `skyfed.runtime.ray`). Recorded in bench/results/ray_equivalence.json
(one entry per preset and overrides): the final validation loss and perplexity of each
runtime, the largest absolute difference between the two final global models, whether
every metrics line (timings left out) is equal, the simulated time and egress bill, and
each run's wall time with the load average. Its top-level `command` lists the commands
of its entries.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import torch
from paired_runs import add_run, run_one, write_results

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "results" / "ray_equivalence.json"


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="default")
    ap.add_argument("--set", dest="sets", action="append", default=[], help="config override KEY=VALUE (repeatable)")
    ap.add_argument("--actors", type=int, default=2)
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--index-only", action="store_true", help="rewrite --out's top-level command from its runs; run nothing")
    args = ap.parse_args(argv)
    if args.index_only:
        return write_results(args.out, json.loads(args.out.read_text()))
    torch.set_num_threads(1)
    base = ["threads=1", *args.sets]
    ray_sets = ["runtime=ray", f"ray.actors={args.actors}", f"ray.num_cpus={args.actors}"]
    load_start = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        inproc = run_one(args.preset, base, Path(tmp) / "inprocess")
        ray = run_one(args.preset, base + ray_sets, Path(tmp) / "ray")
    diff = max(float((inproc["params"][k] - ray["params"][k]).abs().max()) for k in inproc["params"])
    same_keys = set(inproc["params"]) == set(ray["params"])

    def side(r: dict) -> dict:
        s = r["summary"]
        return {"val_loss": s["final"]["val_loss"], "val_ppl": s["final"]["val_ppl"], "sim_time_s": s.get("sim_time_s"),
                "egress_cost_usd": s.get("egress_cost_usd"), "wall_s": round(r["wall_s"], 1)}

    entry = {
        "command": "python bench/ray_equivalence.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "preset": args.preset,
        "sets": base,
        "ray_sets": ray_sets,
        "loadavg_start": load_start,
        "loadavg_end": os.getloadavg(),
        "inprocess": side(inproc),
        "ray": side(ray),
        "max_abs_param_diff": diff,
        "same_parameter_names": same_keys,
        "metrics_lines_equal": inproc["rows"] == ray["rows"],
        "final_equal": inproc["summary"]["final"] == ray["summary"]["final"],
        "bit_identical": same_keys and diff == 0.0 and inproc["rows"] == ray["rows"],
    }
    add_run(args.out, "ray_equivalence", entry)
    print(json.dumps({k: entry[k] for k in ("preset", "inprocess", "ray", "max_abs_param_diff", "bit_identical")}, indent=1))
    return entry


if __name__ == "__main__":
    main()
