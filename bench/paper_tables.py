"""docs/results.md's tables of the paper's experiments 1-3, from the suite's committed run
summaries (bench/results/suite-paper/, bench/paper_suite.py): mean ± sample std over seeds."""

from __future__ import annotations

from paper_suite import groups, sweep_points

from skyfed.report import Group, stat_cell

PAPER = {  # the paper's Table (WikiText-103, three clouds): convergence accuracy, GB communicated
    "fedavg": "87.5%, 4.5 GB", "dynamic": "90.2%, 3.8 GB", "diloco": "91.5%, 3.6 GB (gradient aggregation)",
}


def pct(v: float) -> str:
    return f"{v * 100:.2f}"


def ppl(v: float) -> str:
    return f"{v:.2f}"


def rows(header: list[str], lines: list[list[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(out + ["| " + " | ".join(cells) + " |" for cells in lines]) + "\n"


def first_cells(g: Group) -> tuple[dict, list[str]]:
    s = g.stats()
    return s, [g.label, str(len(g.runs)), stat_cell(s["val_token_acc"], pct), stat_cell(s["val_ppl"], ppl)]


def aggregation() -> str:
    lines = []
    for g in groups("aggregation"):
        s, cells = first_cells(g)
        lines.append([*cells, f"{s['total_gb'][0]:.4f}" if s["total_gb"][0] else "0", PAPER.get(g.label, "")])
    return rows(["run", "seeds", "next-token acc (%)", "val perplexity", "total GB", "paper: accuracy, GB"], lines)


def alpha_sweep() -> str:
    ppls, accs = sweep_points("alpha_sweep", "val_ppl"), sweep_points("alpha_sweep", "val_token_acc", 100.0)
    variants = list(ppls)
    lines = []
    for alpha in sorted(next(iter(ppls.values()))):
        best = min(ppls[v][alpha] for v in variants)
        cells = [f"{ppls[v][alpha]:.2f} ({accs[v][alpha]:.2f}%)" for v in variants]
        lines.append([f"{alpha:g}", *(f"**{c}**" if ppls[v][alpha] == best else c for v, c in zip(variants, cells))])
    return rows(["alpha", *(f"{v} ppl (acc)" for v in variants)], lines)


def synchronization() -> str:
    lines = []
    for g in groups("synchronization"):
        s, cells = first_cells(g)
        lines.append([*cells, f"{s['sim_time_s'][0]:.2f}", f"{s['egress_usd'][0]:.5f}"])  # the same for every seed
    return rows(["run", "seeds", "next-token acc (%)", "val perplexity", "simulated time (s)", "egress (USD)"], lines)


def compression() -> str:
    gs = groups("compression")
    base = next(g for g in gs if g.label == "fp32").stats()
    lines = []
    for g in gs:
        s, cells = first_cells(g)
        mb = s["total_gb"][0] * 1e3
        lines.append([*cells, f"{mb:.4g}", f"{base['total_gb'][0] * 1e3 / mb:.1f}x", f"{s['val_ppl'][0] / base['val_ppl'][0]:.4f}"])
    return rows(["run", "seeds", "next-token acc (%)", "val perplexity", "total MB", "fewer bytes than fp32", "ppl vs fp32"], lines)
