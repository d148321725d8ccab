"""Validation perplexity against epsilon: the default experiment with and without DP.

    nice -n 10 env PYTHONPATH=src python bench/dp_curve.py --preset default \
        --settings none,doc:0.5,doc:1.0,docu:1.0,client:1.0
    PYTHONPATH=src python bench/dp_curve.py --preset smoke --out /tmp/dp_curve.json   # seconds
    python bench/dp_curve.py --plot-only bench/results/dp_curve.json bench/results/dp_curve_document.json

Each setting is `none` (no DP), `doc:SIGMA` (document-level DP-SGD inside each cloud,
opacus, a window as the unit, per-sample clip `--doc-clip`), `docu:SIGMA` (the same
with a whole document as the unit) or `client:SIGMA` (client-level DP-FedAvg with
server noise, update clip `--client-clip`). Every run has the same data, model, seed,
rounds and local steps. The JSON holds per run the final validation perplexity (whole
split), the perplexity by round, epsilon at delta (client-level: the cohort's;
document-level: the largest over the clouds) and wall time; `--plot` (default on)
draws docs/results/dp_curve.png from the JSON.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from skyfed.config import load_config
from skyfed.runtime.simulation import run_simulation

ROOT = Path(__file__).resolve().parent.parent


def setting_overrides(setting: str, args) -> list[str]:
    if setting == "none":
        return []
    kind, sigma = setting.split(":")
    if kind in ("doc", "docu"):
        unit = "window" if kind == "doc" else "document"
        return [f"security.dp.document.noise_multiplier={sigma}", f"security.dp.document.max_grad_norm={args.doc_clip}",
                f"security.dp.document.unit={unit}"]
    if kind == "client":
        return [f"security.dp.clip={args.client_clip}", f"security.dp.noise_multiplier={sigma}"]
    raise SystemExit(f"unknown setting {setting!r}: none, doc:SIGMA or client:SIGMA")


def run_one(setting: str, args, out: Path) -> dict[str, Any]:
    sets = list(args.set) + setting_overrides(setting, args)
    if args.rounds:
        sets.append(f"federation.rounds={args.rounds}")
    if args.steps:
        sets.append(f"train.local_steps={args.steps}")
    cfg = load_config(None, args.preset, sets)
    started = time.perf_counter()
    _, summary = run_simulation(cfg, out)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    privacy = summary.get("privacy", {})
    return {
        "setting": setting,
        "overrides": setting_overrides(setting, args),
        "epsilon": summary.get("epsilon"),
        "delta": privacy.get("delta"),
        "epsilon_document": {c: d["epsilon"] for c, d in privacy.get("document", {}).items()} or None,
        "document_sample_rate": {c: d["sample_rate"] for c, d in privacy.get("document", {}).items()} or None,
        "max_windows_per_document": {c: d["max_windows_per_document"] for c, d in privacy.get("document", {}).items()} or None,
        "document_samples": {c: d.get("windows", d.get("documents")) for c, d in privacy.get("document", {}).items()} or None,
        "val_ppl": summary["final"]["val_ppl"],
        "val_token_acc": summary["final"]["val_token_acc"],
        "ppl_by_round": [r["val_ppl"] for r in rows],
        "epsilon_by_round": [r.get("epsilon") for r in rows],
        "unigram_ppl": summary["unigram_ppl"],
        "wall_s": time.perf_counter() - started,
    }


def plot(reports: list[dict[str, Any]], path: Path) -> None:
    """epsilon (log) against final validation perplexity, one line per kind of DP."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    report = reports[0]
    runs = [r for rep in reports for r in rep["runs"]]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    kinds = (("doc:", "DP-SGD, unit: one window", "o"), ("docu:", "DP-SGD, unit: one document", "^"),
             ("client:", "client-level DP-FedAvg", "s"))
    for kind, label, marker in kinds:
        pts = sorted((r["epsilon"], r["val_ppl"], r["setting"]) for r in runs if r["setting"].startswith(kind))
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=marker, label=label)
            for e, p, s in pts:
                ax.annotate(f"σ={s.split(':')[1]}", (e, p), textcoords="offset points", xytext=(4, 4), fontsize=7)
    base = next((r for r in runs if r["setting"] == "none"), None)
    if base:
        ax.axhline(base["val_ppl"], color="k", ls="--", lw=1, label=f"no DP ({base['val_ppl']:.1f})")
        ax.axhline(base["unigram_ppl"], color="gray", ls=":", lw=1, label=f"unigram ({base['unigram_ppl']:.0f})")
    ax.set(xscale="log", yscale="log", xlabel=f"epsilon at delta = {report['delta']:g}", ylabel="validation perplexity",
           title=f"{report['preset']}: {report['rounds']} rounds x {report['local_steps']} local steps, 3 clouds")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="smoke")
    ap.add_argument("--rounds", type=int, default=None, help="override federation.rounds (record a shortened run)")
    ap.add_argument("--steps", type=int, default=None, help="override train.local_steps")
    ap.add_argument("--settings", default="none,doc:0.5,doc:1.0,doc:2.0,client:1.0")
    ap.add_argument("--doc-clip", type=float, default=1.0, help="per-window gradient clip of DP-SGD")
    ap.add_argument("--client-clip", type=float, default=0.5, help="client update clip C of DP-FedAvg")
    ap.add_argument("--set", action="append", default=[], help="config override KEY=VALUE (repeatable)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "dp_curve.json"))
    ap.add_argument("--png", default=str(ROOT / "docs" / "results" / "dp_curve.png"))
    ap.add_argument("--no-plot", action="store_true")
    ap.add_argument("--plot-only", nargs="+", metavar="JSON", help="only draw --png from these result files")
    args = ap.parse_args(argv)
    if args.plot_only:
        plot([json.loads(Path(f).read_text()) for f in args.plot_only], Path(args.png))
        print(f"wrote {args.png}", file=sys.stderr)
        return {}
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)
    args.set = ["threads=1", *args.set]
    load_start = list(os.getloadavg())
    runs_dir = Path(tempfile.mkdtemp(prefix="skyfed-bench-dp-"))
    cfg = load_config(None, args.preset, args.set + ([f"federation.rounds={args.rounds}"] if args.rounds else [])
                      + ([f"train.local_steps={args.steps}"] if args.steps else []))
    runs = []
    for i, setting in enumerate(s for s in args.settings.split(",") if s):
        print(f"running {setting} ...", file=sys.stderr, flush=True)
        runs.append(run_one(setting, args, runs_dir / f"{i}-{setting.replace(':', '-')}"))
        print(f"  epsilon {runs[-1]['epsilon']}, val ppl {runs[-1]['val_ppl']:.2f}, {runs[-1]['wall_s']:.0f} s", file=sys.stderr)
    report = {
        "benchmark": "dp_curve",
        "command": "python bench/dp_curve.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "preset": args.preset,
        "rounds": cfg.federation.rounds,
        "local_steps": cfg.train.local_steps,
        "batch_size": cfg.train.batch_size,
        "seq_len": cfg.train.seq_len,
        "model": cfg.model.preset,
        "clients": [c.name for c in cfg.federation.clients],
        "delta": cfg.security.dp.delta,
        "accountant": cfg.security.dp.accountant,
        "doc_clip": args.doc_clip,
        "client_clip": args.client_clip,
        "overrides": args.set,
        "load_average_start": load_start,
        "runs": runs,
        "load_average_end": list(os.getloadavg()),
        "torch": torch.__version__,
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    shutil.rmtree(runs_dir, ignore_errors=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}", file=sys.stderr)
    if not args.no_plot:
        plot([report], Path(args.png))
        print(f"wrote {args.png}", file=sys.stderr)
    return report


if __name__ == "__main__":
    main()
