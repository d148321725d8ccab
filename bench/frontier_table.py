"""The markdown table of issue 17's frontier runs, from bench/results/frontier.json
(written by bench/frontier.py): one row per current config and baseline, both seeds.

    python bench/frontier_table.py                 # prints the table docs/results.md holds
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def label(run: dict) -> str:
    name = Path(run["config"]).stem
    return f"{name} --baseline {run['baseline']}" if run["baseline"] else name


def table(runs: list[dict]) -> str:
    """Rows in the file's order of first appearance; each cell lists seed 0, then seed 1."""
    rows: dict[str, list[dict]] = {}
    for run in runs:
        if run.get("current", True):
            rows.setdefault(label(run), []).append(run)
    lines = [
        "| run | seeds | val ppl | ppl / fedavg-fp32 | ppl / sync | total MB (up + down) | fewer bytes than fedavg-fp32 |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, seeds in rows.items():
        seeds.sort(key=lambda r: r["seed"])

        def cells(key: str, fmt: str) -> str:
            values = [r.get(key) for r in seeds]
            return " / ".join("-" if v is None else format(v, fmt) for v in values)

        mb = " / ".join(f"{r['bytes'] / 1e6:.2f}" for r in seeds)
        lines.append(
            f"| {name} | {', '.join(str(r['seed']) for r in seeds)} | {cells('val_ppl', '.2f')} "
            f"| {cells('ppl_vs_fedavg_fp32', '.3f')} | {cells('ppl_vs_sync', '.3f')} | {mb} "
            f"| {cells('fewer_bytes_than_fedavg_fp32', '.1f')} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", type=Path, default=ROOT / "bench" / "results" / "frontier.json")
    args = ap.parse_args()
    print(table(json.loads(args.results.read_text())["runs"]))


if __name__ == "__main__":
    main()
