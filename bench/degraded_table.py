"""The markdown table of issue 17's degraded-clouds runs (goal 3), from
bench/results/degraded.json (written by bench/degraded.py): one row per variant and extra
overrides, its seeds side by side.

Columns: the final perplexity on the whole (clean) validation split, its ratio to the
oracle of the same seed (FedAvg of the three clean clouds), the clean clouds' weight
spread (largest over smallest of their mean weights over the rounds; 1 is equal), the
two degraded clouds' mean total weight, and the rounds a run needed to reach FedAvg's
last-round perplexity (same seed, the same evaluation batches): every round sends the
same bytes in every variant, so this is the paper's "GB to a target" in rounds.

    python bench/degraded_table.py
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from degraded import VARIANTS  # noqa: E402
from frontier_table import joined  # noqa: E402


def label(run: dict) -> str:
    """The variant, with the overrides it was run with beyond the common ones."""
    extra = [s for s in run["sets"] if not s.startswith(("threads=", "seed="))]
    own = VARIANTS[run["variant"]][1]
    extra = extra[: len(extra) - len(own)] if own and extra[-len(own):] == own else extra
    return " ".join([run["variant"], *(f"--set {s}" for s in extra)])


def rounds_to_fedavg(run: dict, runs: list[dict]) -> int | None:
    """Rounds until `run` first evaluated at or below FedAvg's last-round perplexity (same
    seed and overrides), or None."""
    fedavg = next((r for r in runs if r["variant"] == "fedavg" and r["seed"] == run["seed"]
                   and label(r).split(" ", 1)[1:] == label(run).split(" ", 1)[1:]), None)
    if fedavg is None or not fedavg["ppl_curve"]:
        return None
    target = fedavg["ppl_curve"][-1]
    return next((i + 1 for i, ppl in enumerate(run["ppl_curve"]) if ppl is not None and ppl <= target), None)


def table(runs: list[dict]) -> str:
    rows: dict[str, list[dict]] = {}
    for run in runs:
        rows.setdefault(label(run), []).append(run)
    lines = [
        "| variant | seeds | val ppl | ppl / oracle | clean clouds' weight spread | degraded clouds' weight "
        "| rounds to FedAvg's ppl |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, seeds in rows.items():
        seeds.sort(key=lambda r: r["seed"])
        cells = {key: joined([r.get(key) for r in seeds], fmt) for key, fmt in
                 (("val_ppl", ".2f"), ("ppl_vs_oracle", ".3f"), ("clean_weight_spread", ".2f"), ("degraded_weight", ".3f"))}
        cells["rounds"] = joined([rounds_to_fedavg(r, runs) for r in seeds], "d")
        lines.append(f"| {name} | {', '.join(str(r['seed']) for r in seeds)} | " + " | ".join(cells.values()) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", type=Path, default=ROOT / "bench" / "results" / "degraded.json")
    args = ap.parse_args()
    print(table(json.loads(args.results.read_text())["runs"]))


if __name__ == "__main__":
    main()
