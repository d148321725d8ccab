"""Issue 17's frontier configs (configs/frontier/*.yaml) against its references, one run
at a time, each added to bench/results/frontier.json as it finishes.

    PYTHONPATH=src python bench/frontier.py fedavg-fp32 --seeds 0 1 --set threads=1
    PYTHONPATH=src python bench/frontier.py fedavg-fp32 --baseline sync --seeds 0 1 --set threads=1
    PYTHONPATH=src python bench/frontier.py quality bytes --seeds 0 1 --set threads=1
    PYTHONPATH=src python bench/frontier.py fedavg-fp32 --set train.local_steps=10 --set federation.rounds=40 ...

A name is a file of configs/frontier (without .yaml) or a path. Each run goes through
skyfed.api.run, the function behind `skyfed run CONFIG [--baseline sync] --set ...`.
Per config, overrides, baseline and seed the file holds: final val_ppl (the whole
validation split), total bytes up + down, the curve (round, bytes so far, val_ppl and the
simulated clock's seconds at each evaluated round, on the run's evaluation batches), wall time, the load average before and
after, the command, and the config file's SHA-256 and text as run (a run of an earlier
version of a file stays, marked `current: false`). Ratios are recomputed over the whole file at
every write: ppl / fedavg-fp32 and ppl / sync (same seed, no overrides, current file),
and fedavg-fp32's bytes / this run's bytes. The top-level `command` lists the commands
of the entries (bench/paired_runs.write_results). `current`: the entry ran the experiment
the file describes now (the validated config; comments do not count).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from paired_runs import locked, write_results  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
FRONTIER = ROOT / "configs" / "frontier"
REFERENCE = "configs/frontier/fedavg-fp32.yaml"


def config_path(name: str) -> Path:
    p = Path(name)
    if p.suffix in (".yaml", ".yml") and p.exists():
        return p.resolve()
    return FRONTIER / f"{name}.yaml"


def rel(p: Path) -> str:
    try:
        return str(p.resolve().relative_to(ROOT))
    except ValueError:
        return str(p)


def sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def setting_sha(text: str) -> str:
    """SHA-256 of the experiment a config text describes (the validated config, so
    comments and key order do not count)."""
    import yaml
    from skyfed.config import load_config

    cfg = load_config(data=yaml.safe_load(text)).model_dump(mode="json")
    return hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()


def flags(baseline: str | None, sets: list[str]) -> list[str]:
    return (["--baseline", baseline] if baseline else []) + [a for s in sets for a in ("--set", s)]


def quoted(parts: list[str]) -> str:
    return " ".join(shlex.quote(x) for x in parts)


def run_one(path: Path, baseline: str | None, seed: int, sets: list[str], runs_dir: Path) -> dict:
    from skyfed.api import run as run_experiment

    config, config_sha, config_text = rel(path), sha(path), path.read_text()  # as run (the file may change later)
    load_start = os.getloadavg()
    started = time.perf_counter()
    result = run_experiment(path, overrides=[f"seed={seed}"] + sets, baseline=baseline,
                            out=runs_dir / f"{path.stem}-{baseline or 'fed'}-s{seed}-{int(time.time())}")
    wall = time.perf_counter() - started
    s = result.summary
    sent, curve = 0, []  # (round, bytes up + down so far, val_ppl, simulated s) at each evaluated round
    for row in result.metrics():
        sent += row.get("bytes_up", 0) + row.get("bytes_down", 0)
        if row.get("val_ppl") is not None:
            curve.append([row["round"], sent, row["val_ppl"], row.get("sim_time_s")])
    return {
        "config": config, "baseline": baseline, "seed": seed, "sets": sets,
        "config_sha256": config_sha, "config_text": config_text,
        "val_ppl": s["final"]["val_ppl"], "val_tokens": s["final"]["val_tokens"],
        "bytes_up": s["total"]["bytes_up"], "bytes_down": s["total"]["bytes_down"],
        "bytes": s["total"]["bytes_up"] + s["total"]["bytes_down"],
        "rounds": s["rounds"], "curve": curve, "wall_s": wall, "load_start": list(load_start), "load_end": list(os.getloadavg()),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": "PYTHONPATH=src python bench/frontier.py " + quoted([config, "--seeds", str(seed), *flags(baseline, sets)]),
        "cli": quoted(["skyfed", "run", config, *flags(baseline, [f"seed={seed}", *sets])]),
    }


def model_sets(sets: list[str]) -> list[str]:
    """The overrides that change the experiment (threads only changes the speed)."""
    return [s for s in sets if not s.startswith("threads=")]


def reference(runs: list[dict], config: str, seed: int, baseline: str | None = None) -> dict | None:
    """The current run of `config` (with `baseline`) for `seed` without overrides."""
    return next((e for e in runs if e["config"] == config and e.get("current", True) and e["baseline"] == baseline
                 and e["seed"] == seed and not model_sets(e["sets"])), None)


def key(e: dict) -> tuple:
    return (e["config"], e["config_sha256"], tuple(e["sets"]), e["baseline"], e["seed"])


def annotate(runs: list[dict]) -> None:
    """Mark the entries that ran the experiment the config file describes now (comments
    may have changed since) and recompute the ratios."""
    now: dict[str, str | None] = {}
    for e in runs:
        p = ROOT / e["config"]
        if e["config"] not in now:
            now[e["config"]] = setting_sha(p.read_text()) if p.exists() else None
        e["current"] = now[e["config"]] == setting_sha(e["config_text"])

    for e in runs:
        fed, sync = reference(runs, REFERENCE, e["seed"]), reference(runs, REFERENCE, e["seed"], "sync")
        e["ppl_vs_fedavg_fp32"] = e["val_ppl"] / fed["val_ppl"] if fed else None
        e["ppl_vs_sync"] = e["val_ppl"] / sync["val_ppl"] if sync else None
        e["fewer_bytes_than_fedavg_fp32"] = fed["bytes"] / e["bytes"] if fed and e["bytes"] else None


def add(out: Path, entry: dict) -> dict:
    with locked(out):
        results = json.loads(out.read_text()) if out.exists() else {"benchmark": "frontier", "runs": []}
        results["runs"] = [r for r in results["runs"] if key(r) != key(entry)] + [entry]
        annotate(results["runs"])
        return write_results(out, results)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("configs", nargs="+", help="names in configs/frontier (fedavg-fp32, quality, bytes) or paths")
    ap.add_argument("--baseline", choices=["sync", "sequential"], default=None)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--set", action="append", default=[], help="config override, as for skyfed run")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "frontier.json")
    ap.add_argument("--runs-dir", type=Path, default=None, help="where the run directories go (default: a temp dir)")
    args = ap.parse_args()
    runs_dir = args.runs_dir or Path(tempfile.mkdtemp(prefix="frontier-"))
    for name in args.configs:
        path = config_path(name)
        for seed in args.seeds:
            entry = run_one(path, args.baseline, seed, args.set, runs_dir)
            results = add(args.out, entry)
            e = next(r for r in results["runs"] if key(r) == key(entry))
            print(json.dumps({k: e[k] for k in ("config", "baseline", "seed", "sets", "val_ppl", "bytes",
                                                "ppl_vs_fedavg_fp32", "ppl_vs_sync", "fewer_bytes_than_fedavg_fp32",
                                                "wall_s")}), flush=True)


if __name__ == "__main__":
    main()
