"""Validation perplexity by round of the low-rank runs against fp32 (docs/compression.md).

    python bench/plot_compression.py   # reads bench/results/compression.json, writes docs/results/compression_curves.png
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
CURVES = {  # label: row of bench/results/compression.json
    "fp32": "fp32",
    "rank 16 + int4, classic error feedback (2.14%)": "lowrank16_int4",
    "rank 16 + int4, residual in model (2.14%)": "lowrank16_int4_rim",
    "rank 6 -> 22 + int4, residual in model (2.00%)": "lowrank6to22_int4_rim",
}


def main() -> None:
    fig, ax = plt.subplots(figsize=(7, 4.2))
    runs = json.loads((ROOT / "bench" / "results" / "compression.json").read_text())["runs"]
    for label, row in CURVES.items():
        curve = runs[row]["val_ppl_by_round"]
        ax.plot(range(1, len(curve) + 1), curve, marker="o", markersize=3, label=label)
    ax.set(xlabel="round", ylabel="validation perplexity (8 batches)", yscale="log",
           title="Low rank both ways, 10 x 40 steps, Dirichlet 0.1 (bytes vs fp32)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    out = ROOT / "docs" / "results" / "compression_curves.png"
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
