"""The markdown table of issue 17's frontier runs, from bench/results/frontier.json
(written by bench/frontier.py): one row per current config, baseline and overrides,
both seeds. "MB to fedavg-fp32's ppl" is the communication a run needed to reach
fedavg-fp32's final perplexity (same seed): the bytes so far at the first evaluated round
at or below it (the paper's "GB" reading), for runs that recorded their curve.

    python bench/frontier_table.py                 # prints the table docs/results.md holds
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from frontier import REFERENCE, model_sets  # noqa: E402


def label(run: dict) -> str:
    name = Path(run["config"]).stem
    sets = model_sets(run["sets"])
    return " ".join([name, *([f"--baseline {run['baseline']}"] if run["baseline"] else []), *(f"--set {s}" for s in sets)])


def bytes_to_reach(run: dict, runs: list[dict]) -> float | None:
    """Bytes sent until `run` first evaluated at or below fedavg-fp32's final ppl (same seed)."""
    target = next((r["val_ppl"] for r in runs if r["config"] == REFERENCE and r.get("current", True) and r["baseline"] is None
                   and r["seed"] == run["seed"] and not model_sets(r["sets"])), None)
    if target is None or "curve" not in run:
        return None
    return next((sent for _, sent, ppl in run["curve"] if ppl <= target), None)


def table(runs: list[dict]) -> str:
    """Rows in the file's order of first appearance; each cell lists seed 0, then seed 1."""
    rows: dict[str, list[dict]] = {}
    for run in runs:
        if run.get("current", True):
            rows.setdefault(label(run), []).append(run)
    lines = [
        "| run | seeds | val ppl | ppl / fedavg-fp32 | ppl / sync | total MB (up + down) | fewer bytes than fedavg-fp32 "
        "| MB to fedavg-fp32's ppl |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, seeds in rows.items():
        seeds.sort(key=lambda r: r["seed"])

        def cells(key: str, fmt: str) -> str:
            values = [r.get(key) for r in seeds]
            return " / ".join("-" if v is None else format(v, fmt) for v in values)

        mb = " / ".join(f"{r['bytes'] / 1e6:.2f}" for r in seeds)
        reach = [bytes_to_reach(r, runs) for r in seeds]
        to_target = " / ".join("-" if b is None else f"{b / 1e6:.2f}" for b in reach)
        lines.append(
            f"| {name} | {', '.join(str(r['seed']) for r in seeds)} | {cells('val_ppl', '.2f')} "
            f"| {cells('ppl_vs_fedavg_fp32', '.3f')} | {cells('ppl_vs_sync', '.3f')} | {mb} "
            f"| {cells('fewer_bytes_than_fedavg_fp32', '.3g')} | {to_target} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", type=Path, default=ROOT / "bench" / "results" / "frontier.json")
    args = ap.parse_args()
    print(table(json.loads(args.results.read_text())["runs"]))


if __name__ == "__main__":
    main()
