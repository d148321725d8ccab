"""Does secure aggregation change the result? One experiment with and without it.

    PYTHONPATH=src python bench/secagg_parity.py                   # the default experiment
    PYTHONPATH=src python bench/secagg_parity.py --preset smoke --set security.secagg.bound=1.0

The sum in the ring is exact, so the only differences are the fixed-point rounding of
each coordinate (2^-f, f set by the ring's bits and `security.secagg.bound`) and the
clipping to the bound. Recorded in bench/results/secagg_parity.json (one entry per
preset and overrides): each run's final validation loss and perplexity, their relative
difference, the largest absolute difference between the two final global models, the
bytes up and down, and the wall times with the load average. Both runs use one torch
thread and run in sequence.
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
OUT = ROOT / "bench" / "results" / "secagg_parity.json"


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="default")
    ap.add_argument("--set", dest="sets", action="append", default=[], help="config override KEY=VALUE (repeatable)")
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--index-only", action="store_true", help="rewrite --out's top-level command from its runs; run nothing")
    args = ap.parse_args(argv)
    if args.index_only:
        return write_results(args.out, json.loads(args.out.read_text()))
    torch.set_num_threads(1)
    base = ["threads=1", *args.sets]
    load_start = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        plain = run_one(args.preset, base, Path(tmp) / "plain")
        secure = run_one(args.preset, base + ["security.secure_aggregation=true"], Path(tmp) / "secure")
    diff = max(float((plain["params"][k] - secure["params"][k]).abs().max()) for k in plain["params"])

    def side(r: dict) -> dict:
        s = r["summary"]
        return {"val_loss": s["final"]["val_loss"], "val_ppl": s["final"]["val_ppl"], "bytes_up": s["total"]["bytes_up"],
                "bytes_down": s["total"]["bytes_down"], "wall_s": round(r["wall_s"], 1)}

    p, s = side(plain), side(secure)
    entry = {
        "command": "python bench/secagg_parity.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "preset": args.preset,
        "sets": base,
        "loadavg_start": load_start,
        "loadavg_end": os.getloadavg(),
        "plain": p,
        "secure": s,
        "val_ppl_relative_diff": abs(s["val_ppl"] - p["val_ppl"]) / p["val_ppl"],
        "max_abs_param_diff": diff,
    }
    add_run(args.out, "secagg_parity", entry)
    print(json.dumps({k: entry[k] for k in ("preset", "plain", "secure", "val_ppl_relative_diff", "max_abs_param_diff")}, indent=1))
    return entry


if __name__ == "__main__":
    main()
