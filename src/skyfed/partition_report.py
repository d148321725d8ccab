"""The partition report as a rich table and a PNG (tokens, topic mix and JSD per client)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.table import Table


def partition_table(stats: dict[str, Any]) -> Table:
    table = Table(title=f"partition: {stats['method']}  (heterogeneity, mean JSD to pooled: {stats['heterogeneity_jsd']:.4f} bits)")
    table.add_column("client")
    table.add_column("docs", justify="right")
    table.add_column("tokens", justify="right")
    table.add_column("share", justify="right")
    table.add_column("JSD to pooled (bits)", justify="right")
    table.add_column("topic histogram")
    for name, c in stats["clients"].items():
        hist = " ".join(str(h) for h in c["topic_hist"]) if c.get("topic_hist") is not None else ""
        table.add_row(name, f"{c['docs']:,}", f"{c['tokens']:,}", f"{c['share'] * 100:.1f}%", f"{c['jsd_to_pooled']:.4f}", hist)
    table.add_row("total", f"{stats['total_docs']:,}", f"{stats['total_tokens']:,}", "100%", "", "")
    return table


def plot_partition(stats: dict[str, Any], path: Path) -> None:
    """Two panels: tokens per client stacked by topic, and each client's JSD to the pooled data."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    names = list(stats["clients"])
    clients = [stats["clients"][n] for n in names]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    x = np.arange(len(names))
    if clients and clients[0].get("topic_hist") is not None:
        hists = np.array([c["topic_hist"] for c in clients], dtype=float)
        docs = np.maximum(hists.sum(1, keepdims=True), 1)
        tokens = np.array([c["tokens"] for c in clients], dtype=float)[:, None]
        parts = hists / docs * tokens  # tokens apportioned by the client's topic mix (by documents)
        bottom = np.zeros(len(names))
        cmap = plt.get_cmap("tab20")
        for k in range(parts.shape[1]):
            ax1.bar(x, parts[:, k], bottom=bottom, color=cmap(k % 20), label=f"topic {k}")
            bottom += parts[:, k]
        ax1.legend(fontsize=7, ncol=2)
    else:
        ax1.bar(x, [c["tokens"] for c in clients])
    ax1.set_xticks(x, names)
    ax1.set_ylabel("tokens")
    ax1.set_title("tokens per client, by topic mix")
    ax2.bar(x, [c["jsd_to_pooled"] for c in clients], color="tab:red")
    ax2.set_xticks(x, names)
    ax2.set_ylabel("Jensen-Shannon divergence (bits)")
    ax2.set_title("unigram divergence to the pooled corpus")
    fig.suptitle(f"partition {stats['method']}: mean JSD {stats['heterogeneity_jsd']:.4f} bits")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
