"""Compare aggregation strategies at equal local training tokens.

    PYTHONPATH=src python bench/strategies.py --preset smoke --rounds 4 --steps 20 --set threads=1
    # later, the issue's setting (non-IID Dirichlet partition, one slow cloud), e.g.:
    PYTHONPATH=src python bench/strategies.py --preset default --rounds 10 --steps 40 \
        --set data.partition.method=dirichlet --set data.partition.alpha=0.1 ...

Runs FedAvg, dynamic weighting, DiLoCo (FedOpt with Nesterov), FedBuff and FedAsync
on the same config (same data, model, seed, rounds x clients x local steps), plus the
synchronous data-parallel baseline when `skyfed.baselines.run_baseline` exists, and
writes JSON with, per strategy: final validation perplexity and next-token accuracy
(whole validation split), the ratio of its perplexity to FedAvg's and to the
baseline's, and how soon it reached FedAvg's final per-round perplexity — as a
fraction of the local-training budget and, when the metrics carry `sim_time_s`
(the transport's simulated clock), in simulated seconds and as a ratio to FedAvg.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from skyfed.config import load_config
from skyfed.runtime.simulation import run_simulation

DEFAULT = ["fedavg", "dynamic", "diloco", "fedbuff", "fedasync"]


def default_params(name: str, num_clients: int) -> dict[str, Any]:
    return {"fedbuff": {"buffer_size": num_clients}}.get(name, {})


def time_to_target(rows: list[dict[str, Any]], target_ppl: float) -> dict[str, Any]:
    """First metrics line whose val_ppl <= target: budget fraction and simulated seconds."""
    for i, row in enumerate(rows):
        if row.get("val_ppl") is not None and row["val_ppl"] <= target_ppl:  # eval.interval: some rows have none
            return {
                "reached": True,
                "budget_fraction": (i + 1) / len(rows),
                "sim_time_s": row.get("sim_time_s"),
            }
    return {"reached": False, "budget_fraction": None, "sim_time_s": None}


def run_one(name: str, params: dict[str, Any], args, out: Path) -> dict[str, Any]:
    sets = list(args.set) + [
        f"federation.rounds={args.rounds}", f"train.local_steps={args.steps}",
        f"federation.strategy.name={name}", f"federation.strategy.params={json.dumps(params)}",
    ]
    cfg = load_config(args.config, args.preset, sets)
    started = time.perf_counter()
    run, summary = run_simulation(cfg, out)
    rows = run.read_metrics()
    n = len(cfg.federation.clients)
    t = cfg.train
    return {
        "params": params,
        "val_ppl": summary["final"]["val_ppl"],
        "val_token_acc": summary["final"]["val_token_acc"],
        "val_loss": summary["final"]["val_loss"],
        "local_tokens": cfg.federation.rounds * n * t.local_steps * t.batch_size * t.seq_len,
        "last_round_ppl": rows[-1]["val_ppl"],
        "ppl_curve": [r["val_ppl"] for r in rows],
        "sim_time_curve": [r.get("sim_time_s") for r in rows],
        "final_version": rows[-1]["version"],
        "wall_s": time.perf_counter() - started,
        "rows": rows,
    }


def run_sync_baseline(args, out: Path) -> dict[str, Any] | None:
    try:
        from skyfed.baselines import run_baseline
    except ImportError:
        return None  # hook: the lead's `skyfed.baselines` (sync data-parallel) is not in this branch yet
    cfg = load_config(args.config, args.preset, list(args.set) + [f"federation.rounds={args.rounds}", f"train.local_steps={args.steps}"])
    _, summary = run_baseline(cfg, "sync", out, None)
    return {"val_ppl": summary["final"]["val_ppl"], "val_token_acc": summary["final"]["val_token_acc"]}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config", nargs="?", default=None, help="experiment YAML (optional)")
    ap.add_argument("--preset", default="smoke")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--steps", type=int, default=20, help="local steps per round")
    ap.add_argument("--set", action="append", default=[], help="config override KEY=VALUE (repeatable)")
    ap.add_argument("--strategies", default=",".join(DEFAULT), help="comma-separated strategy names")
    ap.add_argument("--params", action="append", default=[], help='NAME=JSON strategy params, e.g. diloco={"lr":0.5}')
    ap.add_argument("--no-baseline", action="store_true", help="skip the sync data-parallel baseline")
    ap.add_argument("--out", default="bench/results/strategies.json")
    ap.add_argument("--runs-dir", default=None, help="keep the run directories here (default: a temp dir)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    names = [s for s in args.strategies.split(",") if s]
    if "fedavg" not in names:
        names.insert(0, "fedavg")  # the reference
    overrides = {k: json.loads(v) for k, v in (p.split("=", 1) for p in args.params)}
    n_clients = len(load_config(args.config, args.preset, list(args.set)).federation.clients)
    runs_dir = Path(args.runs_dir or tempfile.mkdtemp(prefix="skyfed-bench-strategies-"))

    results: dict[str, dict[str, Any]] = {}
    for name in names:
        params = overrides.get(name, default_params(name, n_clients))
        print(f"running {name} {params} ...", file=sys.stderr, flush=True)
        results[name] = run_one(name, params, args, runs_dir / name)
    baseline = None if args.no_baseline else run_sync_baseline(args, runs_dir / "baseline-sync")

    ref = results["fedavg"]
    target = ref["last_round_ppl"]
    ref_time = ref["rows"][-1].get("sim_time_s")
    for name, r in results.items():
        hit = time_to_target(r.pop("rows"), target)
        if ref_time is None:  # FedAvg's lines carry no transport clock: no time comparison
            hit["sim_time_s"] = None
        r["ppl_vs_fedavg"] = r["val_ppl"] / ref["val_ppl"]
        r["acc_vs_fedavg"] = r["val_token_acc"] / ref["val_token_acc"] if ref["val_token_acc"] else None
        r["ppl_vs_sync_baseline"] = r["val_ppl"] / baseline["val_ppl"] if baseline else None
        r["to_fedavg_final_ppl"] = hit
        r["time_vs_fedavg"] = (
            hit["sim_time_s"] / ref_time if hit["reached"] and hit["sim_time_s"] is not None and ref_time else None
        )
    report = {
        "benchmark": "strategies",
        "command": "python bench/strategies.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "preset": args.preset,
        "rounds": args.rounds,
        "local_steps": args.steps,
        "overrides": args.set,
        "target_ppl": target,
        "sync_baseline": baseline,
        "sync_baseline_note": None if baseline else "skyfed.baselines not available (or --no-baseline): ratios are n/a",
        "results": results,
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(table(report))
    print(f"wrote {out}", file=sys.stderr)
    return report


def _f(x: Any, fmt: str) -> str:
    return "n/a" if x is None else format(x, fmt)


def table(report: dict[str, Any]) -> str:
    lines = [
        "| strategy | val ppl | token acc | ppl / FedAvg | ppl / sync DP | budget to FedAvg's ppl | sim time to it | time / FedAvg |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in report["results"].items():
        hit = r["to_fedavg_final_ppl"]
        lines.append(
            f"| {name} | {r['val_ppl']:.1f} | {100 * r['val_token_acc']:.2f}% | {r['ppl_vs_fedavg']:.3f} | "
            f"{_f(r['ppl_vs_sync_baseline'], '.3f')} | {_f(hit['budget_fraction'], '.2f') if hit['reached'] else 'not reached'} | "
            f"{_f(hit['sim_time_s'], '.1f')} | {_f(r['time_vs_fedavg'], '.2f')} |"
        )
    if report["sync_baseline"]:
        b = report["sync_baseline"]
        lines.append(f"| sync data-parallel | {b['val_ppl']:.1f} | {100 * b['val_token_acc']:.2f}% | | 1.000 | | | |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
