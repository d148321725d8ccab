"""What the benchmarks that compare two runs of one experiment share (ray_equivalence.py,
secagg_parity.py): one run with its final model, metrics and summary, and a results file
with one entry per preset and overrides whose top-level `command` lists the commands that
wrote its entries."""

from __future__ import annotations

import contextlib
import fcntl
import json
import time
from pathlib import Path

TIMING = {"compute_s", "aggregate_s", "eval_s", "wall_time_s", "elapsed_s"}  # measured, not simulated


def run_one(preset: str, sets: list[str], out: Path) -> dict:
    """Run the experiment in `out`: its final parameters, its metrics lines without their
    measured times, its summary and its wall time."""
    from skyfed.config import load_config
    from skyfed.federation.checkpoint import load_checkpoint
    from skyfed.runtime.simulation import run_simulation

    started = time.perf_counter()
    run, summary = run_simulation(load_config(None, preset, sets), out)
    params, _ = load_checkpoint(run.path / "checkpoint")
    rows = [{k: v for k, v in r.items() if k not in TIMING} for r in run.read_metrics()]
    return {"params": params, "rows": rows, "summary": summary, "wall_s": time.perf_counter() - started}


@contextlib.contextmanager
def locked(out: Path):
    """Hold an exclusive lock on OUT.lock: runs side by side read, change and write `out` one at a time."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.with_name(out.name + ".lock"), "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def write_results(out: Path, results: dict) -> dict:
    """Write `results` to `out`, its top-level `command` the commands of its runs (one per
    preset and overrides), in order."""
    results["command"] = " && ".join(r["command"] for r in results["runs"])
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    return results


def add_run(out: Path, benchmark: str, entry: dict) -> dict:
    """Put `entry` into the results file `out` in place of an earlier run of the same
    preset and overrides, and write it."""
    results = json.loads(out.read_text()) if out.exists() else {"benchmark": benchmark, "runs": []}
    key = (entry["preset"], entry["sets"])
    results["runs"] = [r for r in results["runs"] if (r["preset"], r["sets"]) != key] + [entry]
    return write_results(out, results)
