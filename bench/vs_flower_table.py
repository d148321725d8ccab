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


def full(d: dict[str, Any]) -> str:
    """docs/vs_flower.md: fp32 skyfed against Flower, time split by where it goes."""
    s, f = d["skyfed"], d["flower"]

    def row(name: str, key: str, fmt: str, goal: str = "", digits: int = 2) -> tuple[str, ...]:
        return (name, format(s[key], fmt), format(f[key], fmt), f"{s[key] / f[key]:.{digits}f}", goal)

    ppl = s["final"]["val_ppl"] / f["final"]["val_ppl"]
    wall, idle = s["wall_s"] / f["wall_s"], s["not_training_s"] / f["not_training_s"]
    return _rows("| | skyfed | Flower " + d["machine"]["flwr"][:4] + " | skyfed / Flower | goal |", [
        ("final validation perplexity", f"{s['final']['val_ppl']:.4f}", f"{f['final']['val_ppl']:.4f}", f"{ppl:.5f}",
         "equal within seed noise: " + ("**met**" if abs(ppl - 1) < 0.01 else "not met")),
        ("next-token accuracy", f"{s['final']['val_token_acc']:.3%}", f"{f['final']['val_token_acc']:.3%}", "", ""),
        row("bytes per client per round, up", "bytes_up_per_client_round", ",.0f", digits=3),
        row("bytes per client per round, down", "bytes_down_per_client_round", ",.0f", digits=3),
        (*row("total wall time (s)", "wall_s", ".1f")[:3], f"**{wall:.2f}**", _goal(wall, 0.75)),
        row("local training (s)", "train_s", ".1f", "(same computation)"),
        row("evaluation after each round (s)", "eval_s", ".1f"),
        (*row("not training, wall - training (s)", "not_training_s", ".1f")[:3], f"**{idle:.2f}**", _goal(idle, 0.5)),
        row("framework overhead, wall - training - evaluation (s)", "framework_overhead_s", ".1f"),
        row("steady-round overhead (s / round)", "steady_round_overhead_s", ".3f"),
    ])


def compressed(d: dict[str, Any]) -> str:
    """docs/vs_flower.md: skyfed with the compressed chain (`skyfed_compressed.set`) against fp32 Flower."""
    c, f = d["skyfed_compressed"], d["flower"]
    fewer, ppl = _per_round(f) / _per_round(c), c["final"]["val_ppl"] / f["final"]["val_ppl"]
    return _rows("| | skyfed, compressed | Flower " + d["machine"]["flwr"][:4] + " (fp32) | ratio | goal |", [
        ("bytes per client per round, up + down", f"{_per_round(c):,.0f}", f"{_per_round(f):,.0f}", f"**{fewer:.1f}x fewer**",
         f">= 50x: {'met' if fewer >= 50 else 'not met'}"),
        ("final validation perplexity", f"{c['final']['val_ppl']:.2f}", f"{f['final']['val_ppl']:.2f}", f"**{ppl:.3f}**",
         f"within 3%: {'met' if ppl <= 1.03 else 'not met'} ({(ppl - 1):.1%})"),
        ("next-token accuracy", f"{c['final']['val_token_acc']:.2%}", f"{f['final']['val_token_acc']:.2%}", "", ""),
        ("total wall time (s)", f"{c['wall_s']:.1f}", f"{f['wall_s']:.1f}", f"{c['wall_s'] / f['wall_s']:.2f}", ""),
    ])
