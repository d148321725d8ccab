"""Dynamic weighting with degraded clouds (issue 17, goal 3): configs/frontier/degraded.yaml
against its oracle twin, plain FedAvg and the old softmax weighting.

    PYTHONPATH=src python bench/degraded.py --tiny               # smoke-sized sanity check (minutes)
    PYTHONPATH=src python bench/degraded.py --tiny --set federation.rounds=8 --set train.local_steps=20 \
        --out bench/results/degraded_tiny_8x20.json                # a little longer
    PYTHONPATH=src python bench/degraded.py --seeds 0 1          # the configs as written (hours on CPU)

Variants (all on the same five clouds, shards and degraded text):
  robust   degraded.yaml as written: dynamic, server score, mapping robust
  robust-holdout  the same, scored on each cloud's own (degraded) holdout slice
  softmax  dynamic with the strategy's defaults (holdout score, softmax at 0.1, 5% floor)
  fedavg   degraded-oracle.yaml with exclude=[]: every cloud, token weights
  oracle   degraded-oracle.yaml: FedAvg of the three clean clouds only

Adds each run to bench/results/degraded[_tiny].json as it finishes (replacing an earlier
run of the same variant, seed and overrides), so runs of separate invocations, one at a
time or side by side, end up in one file: per variant and seed the final validation
perplexity (whole split), its ratio to the oracle's of the same seed and overrides, the per-round strategy weights and
their mean, the dynamic strategy's scores per round, the clean clouds' weight spread (max / min of the mean weights), the
degraded clouds' mean total weight, with the command that reproduces the run and the load
average.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from paired_runs import locked  # noqa: E402
FRONTIER = ROOT / "configs" / "frontier"
TINY = ["model.preset=gpt2-micro", "tokenizer.vocab_size=512", "data.max_train_tokens=100000",
        "data.max_valid_tokens=8000", "train.local_steps=10", "train.batch_size=4", "train.seq_len=32",
        "train.warmup_steps=2", "federation.rounds=4", "eval.max_batches=2", "eval.batch_size=8"]
VARIANTS = {
    "robust": ("degraded.yaml", []),
    "robust-holdout": ("degraded.yaml", ["federation.strategy.params.score=holdout"]),
    "softmax": ("degraded.yaml", ["federation.strategy.params={}"]),
    "fedavg": ("degraded-oracle.yaml", ["federation.strategy.params.exclude=[]"]),
    "oracle": ("degraded-oracle.yaml", []),
}


def run_variant(name: str, sets: list[str], out: Path) -> dict:
    from skyfed.api import run

    file, own = VARIANTS[name]
    started = time.perf_counter()
    result = run(FRONTIER / file, overrides=[*sets, *own], out=out)
    rows = result.metrics()
    weights = [r.get("weights", {}) for r in rows]
    clients = list(weights[-1]) if weights and weights[-1] else []
    mean = {c: sum(w.get(c, 0.0) for w in weights) / len(weights) for c in clients}
    degraded = [c.name for c in result_clients(result.run_dir) if c.degrade is not None]
    clean = [c for c in clients if c not in degraded]
    return {
        "variant": name,
        "config": f"configs/frontier/{file}",
        "sets": [*sets, *own],
        "val_ppl": result.summary["final"]["val_ppl"],
        "val_tokens": result.summary["final"]["val_tokens"],
        "ppl_curve": [r.get("val_ppl") for r in rows],
        "weights_by_round": weights,
        "scores_by_round": [r.get("scores") for r in rows],  # the dynamic strategy's loss per cloud
        "mean_weights": mean,
        "clean_weight_spread": (max(mean[c] for c in clean) / min(mean[c] for c in clean))
        if clean and min(mean[c] for c in clean) > 0 else None,
        "degraded_weight": sum(mean.get(c, 0.0) for c in degraded),
        "wall_s": round(time.perf_counter() - started, 1),
    }


def result_clients(run_dir: Path):
    from skyfed.config import load_config

    return load_config(run_dir / "config.yaml").federation.clients


def add_run(out: Path, rec: dict) -> dict:
    """Put `rec` into the results file `out` in place of an earlier run of the same variant,
    seed and overrides, recompute every run's ratio to the oracle of its seed and overrides
    (those beyond the variant's own), and write it."""
    with locked(out):
        results = json.loads(out.read_text()) if out.exists() else {"benchmark": "degraded", "runs": []}
        key = lambda r: (r["variant"], r["seed"], r["sets"])  # noqa: E731
        runs = [r for r in results["runs"] if key(r) != key(rec)] + [rec]
        for r in runs:
            base = r["sets"][: len(r["sets"]) - len(VARIANTS[r["variant"]][1])]
            oracle = next((o for o in runs if o["variant"] == "oracle" and o["seed"] == r["seed"] and o["sets"] == base),
                          None)
            r["ppl_vs_oracle"] = r["val_ppl"] / oracle["val_ppl"] if oracle else None
        results["runs"] = runs
        results["command"] = " && ".join(dict.fromkeys(r["command"] for r in runs if r.get("command")))
        out.write_text(json.dumps(results, indent=1) + "\n")
        return results


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="smoke-sized runs (gpt2-micro, 4 rounds x 10 steps)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--set", dest="sets", action="append", default=[], help="extra override KEY=VALUE (repeatable)")
    ap.add_argument("--out", type=Path, default=None, help="default bench/results/degraded[_tiny].json")
    args = ap.parse_args(argv)
    out = args.out or ROOT / "bench" / "results" / ("degraded_tiny.json" if args.tiny else "degraded.json")
    results: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            sets = [*(TINY if args.tiny else []), "threads=1", f"seed={seed}", *args.sets]
            for name in args.variants:
                load_start = os.getloadavg()
                rec = {"seed": seed, **run_variant(name, sets, Path(tmp) / f"{name}-{seed}")}
                rec["loadavg_start"], rec["loadavg_end"] = load_start, os.getloadavg()
                rec["command"] = "python bench/degraded.py " + " ".join(
                    [*(["--tiny"] if args.tiny else []), "--seeds", str(seed), "--variants", name,
                     *(f"--set {s}" for s in args.sets), *(["--out", str(args.out)] if args.out else [])])
                results = add_run(out, rec)
                print(json.dumps({k: rec[k] for k in ("variant", "seed", "val_ppl", "mean_weights", "wall_s")}), flush=True)
    return results


if __name__ == "__main__":
    main()
