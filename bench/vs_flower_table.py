"""The skyfed-vs-Flower tables of docs/results.md and docs/vs_flower.md, from
bench/results/vs_flower.json (bench/vs_flower.py); the goals are issue 9's."""

from __future__ import annotations

from typing import Any


def _rows(header: str, lines: list[tuple[str, ...]]) -> str:
    cols = header.count("|") - 1
    return "\n".join([header, "|" + "---|" * cols, *("| " + " | ".join(cells) + " |" for cells in lines)]) + "\n"


def _goal(ratio: float, limit: float) -> str:
    return f"<= {limit}: {'met' if ratio <= limit else 'not met'}"


def _per_round(side: dict[str, Any]) -> float:
    return side["bytes_up_per_client_round"] + side["bytes_down_per_client_round"]


def summary(d: dict[str, Any]) -> str:
    """docs/results.md: the headline numbers, fp32 and compressed."""
    s, f, c = d["skyfed"], d["flower"], d.get("skyfed_compressed")
    ppl = s["final"]["val_ppl"] / f["final"]["val_ppl"]
    lines = [
        ("final validation perplexity", f"{s['final']['val_ppl']:.3f}", f"{f['final']['val_ppl']:.3f}", f"{ppl:.5f}",
         "agree within seed noise: " + ("met" if abs(ppl - 1) < 0.01 else "not met")),
        ("bytes per client per round (up)", f"{s['bytes_up_per_client_round']:,.0f}", f"{f['bytes_up_per_client_round']:,.0f}",
         f"{s['bytes_up_per_client_round'] / f['bytes_up_per_client_round']:.3f}", ""),
        ("total wall time", f"{s['wall_s']:.1f} s", f"{f['wall_s']:.1f} s", f"{s['wall_s'] / f['wall_s']:.3f}",
         _goal(s["wall_s"] / f["wall_s"], 0.75)),
        ("time not spent in local training", f"{s['not_training_s']:.1f} s", f"{f['not_training_s']:.1f} s",
         f"{s['not_training_s'] / f['not_training_s']:.2f}", _goal(s["not_training_s"] / f["not_training_s"], 0.5)),
        ("framework overhead (not training, not evaluating)", f"{s['framework_overhead_s']:.1f} s",
         f"{f['framework_overhead_s']:.1f} s", f"{s['framework_overhead_s'] / f['framework_overhead_s']:.2f}", ""),
    ]
    if c:
        fewer, cppl = _per_round(f) / _per_round(c), c["final"]["val_ppl"] / f["final"]["val_ppl"]
        lines.append((
            "skyfed compressed (`skyfed_compressed.set`): bytes per client per round up + down, perplexity",
            f"{_per_round(c):,.0f} B, {c['final']['val_ppl']:.2f}", f"{_per_round(f):,.0f} B, {f['final']['val_ppl']:.2f}",
            f"{fewer:.1f}x fewer, {cppl:.3f}x",
            f">= 50x at <= 1.03x: bytes {'met' if fewer >= 50 else 'not met'}, perplexity {'met' if cppl <= 1.03 else 'not met'}"))
    return _rows("| | skyfed | Flower " + d["machine"]["flwr"][:4] + " | ratio | issue goal |", lines)
