"""The paper suite's run summaries, committed: collect them from a finished suite, and
redraw docs/results.md's figures from them.

    .venv/bin/skyfed suite paper                                  # runs/suite-paper/ (models included)
    PYTHONPATH=src python bench/paper_suite.py collect            # -> bench/results/suite-paper/
    PYTHONPATH=src python bench/paper_suite.py figures            # -> docs/results/*.png (make tables)

`collect` copies each planned run's `config.yaml`, `summary.json` and `metrics.jsonl`
(about 25 KB; no model, checkpoint or client state; each summary gains a top-level
`command` that re-runs it) into bench/results/suite-paper/, in
the suite's own layout (EXPERIMENT/runs/RUN/), so `skyfed.suite.write_reports` and
skyfed.report read it like a suite output folder. `collected.json` records the command,
the manifest's SHA-256, the runs' summed wall time and when it was collected. The
tables of docs/results.md's experiments 1-3 come from these files
(bench/paper_tables.py, through bench/doc_tables.py).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COMMITTED = ROOT / "bench" / "results" / "suite-paper"
KEPT = ("config.yaml", "summary.json", "metrics.jsonl")
FIGURES = ROOT / "docs" / "results"


def planned(out: Path):
    """The paper suite's manifest and its runs, with directories under `out`."""
    from skyfed.suite import load_suite, plan_suite

    spec = load_suite("paper")
    return spec, plan_suite(spec, out)


def collect(source: Path) -> dict:
    spec, plan = planned(source)
    missing = [str(r.dir) for r in plan if not (r.dir / "summary.json").exists()]
    if missing:
        raise SystemExit(f"paper_suite.py: {len(missing)} runs of the suite are not finished, e.g. {missing[0]}")
    if COMMITTED.exists():
        shutil.rmtree(COMMITTED)
    wall = 0.0
    for run in plan:
        dest = COMMITTED / run.dir.relative_to(source)
        dest.mkdir(parents=True)
        for name in KEPT:
            shutil.copyfile(run.dir / name, dest / name)
        summary = json.loads((run.dir / "summary.json").read_text())
        command = f"skyfed suite paper --only {run.experiment} && PYTHONPATH=src python bench/paper_suite.py collect"
        (dest / "summary.json").write_text(json.dumps({"command": command, **summary}, indent=2) + "\n")
        wall += summary.get("wall_time_s") or 0.0
    info = {
        "command": "skyfed suite paper && PYTHONPATH=src python bench/paper_suite.py collect",
        "manifest": str(spec.path.resolve().relative_to(ROOT)), "manifest_sha256": hashlib.sha256(spec.path.read_bytes()).hexdigest(),
        "runs": len(plan), "runs_wall_s": wall, "collected_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    (COMMITTED / "collected.json").write_text(json.dumps(info, indent=1) + "\n")
    return info


def groups(experiment: str, committed: Path = COMMITTED):
    """The committed runs of one experiment grouped by label (seeds together), in the suite's order."""
    from skyfed.report import group_runs, load_run

    _, plan = planned(committed)
    return group_runs(load_run(r.dir, r.label) for r in plan if r.experiment == experiment)


def sweep_points(experiment: str, key: str, scale: float = 1.0, committed: Path = COMMITTED) -> dict[str, dict[float, float]]:
    """variant -> {swept value: mean final `key` x scale} of a swept experiment."""
    from skyfed.report import load_run

    _, plan = planned(committed)
    by: dict[str, dict[float, list[float]]] = {}
    for r in plan:
        if r.experiment == experiment:
            final = load_run(r.dir).final()[key]
            by.setdefault(r.variant, {}).setdefault(float(r.sweep_value), []).append(final * scale)
    return {v: {x: sum(ys) / len(ys) for x, ys in pts.items()} for v, pts in by.items()}


def figures() -> list[Path]:
    from skyfed.report import plot_metric, plot_sweep

    FIGURES.mkdir(parents=True, exist_ok=True)
    written = []
    for experiment, axis, name, title in (
        ("aggregation", "round", "aggregation_ppl_vs_round.png", "Experiment 1: validation perplexity vs round"),
        ("synchronization", "simtime", "synchronization_ppl_vs_simtime.png", "Experiment 2: validation perplexity vs simulated time"),
        ("compression", "bytes", "compression_ppl_vs_bytes.png", "Experiment 3: validation perplexity vs bytes"),
    ):
        tmp = FIGURES / f".{experiment}"
        tmp.mkdir(exist_ok=True)
        path, _ = plot_metric(groups(experiment), axis, "ppl", tmp, title)
        shutil.move(str(path), FIGURES / name)
        shutil.rmtree(tmp)
        written.append(FIGURES / name)
    points = {v: [(x, y, 0.0) for x, y in pts.items()] for v, pts in sweep_points("alpha_sweep", "val_ppl").items()}
    written.append(plot_sweep(points, "Dirichlet alpha", "final validation perplexity", FIGURES / "alpha_sweep_ppl.png",
                              "Experiment 1b: final validation perplexity vs Dirichlet alpha (one seed)"))
    return written


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("action", choices=["collect", "figures"])
    ap.add_argument("--from", dest="source", type=Path, default=ROOT / "runs" / "suite-paper",
                    help="the finished suite's folder (collect; default runs/suite-paper)")
    args = ap.parse_args(argv)
    if args.action == "collect":
        print(json.dumps(collect(args.source.resolve()), indent=1))
    else:
        for path in figures():
            print(f"wrote {path.relative_to(ROOT)}")


if __name__ == "__main__":
    sys.exit(main())
