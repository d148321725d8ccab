"""Reports from run directories: a Markdown comparison table and small PNG plots.

    skyfed report runs/fedavg-* runs/diloco-* --out reports/agg
    skyfed report runs/a runs/b --out reports/ab --labels fedavg,diloco

Each run directory holds `config.yaml`, `metrics.jsonl` (one line per round) and
`summary.json`. Runs with the same label (by default the config's `name`) are seeds
of one setting: the table shows their mean ± standard deviation (sample std, n-1) and
the plots their mean curve with a ±1 std band. Optional fields (simulated time,
egress cost, compression ratios, bytes of a centralized baseline) are shown where
the runs have them and left out, with a note, where they do not.
"""

from __future__ import annotations

import json
import logging
import math
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import yaml

from skyfed.errors import DataError
from skyfed.metrics import atomic_write_text

log = logging.getLogger(__name__)

PLOT_SIZE = (6.0, 4.0)  # inches
PLOT_DPI = 100


@dataclass
class RunData:
    path: Path
    label: str
    seed: int | None
    config: dict[str, Any]
    summary: dict[str, Any]
    rows: list[dict[str, Any]]

    # ---- per-round series (numpy arrays, aligned with rows)

    def series(self, key: str) -> np.ndarray | None:
        """Values of `key` per round, or None if any row lacks it."""
        if not self.rows or any(key not in r or r[key] is None for r in self.rows):
            return None
        return np.asarray([float(r[key]) for r in self.rows])

    def evaluated_series(self, key: str) -> np.ndarray | None:
        """Values of `key` per round, NaN where the round was not evaluated (eval.interval);
        None if no row has it."""
        if not any(r.get(key) is not None for r in self.rows):
            return None
        return np.asarray([float(r[key]) if r.get(key) is not None else np.nan for r in self.rows])

    def rounds(self) -> np.ndarray:
        return np.asarray([int(r.get("round", i)) + 1 for i, r in enumerate(self.rows)], dtype=float)

    def cum_bytes(self) -> np.ndarray:
        """Cumulative bytes communicated (up + down) at the end of each round."""
        up, down = self.series("cum_bytes_up"), self.series("cum_bytes_down")
        if up is not None and down is not None:
            return up + down
        per = np.asarray([float(r.get("bytes_up", 0) or 0) + float(r.get("bytes_down", 0) or 0) for r in self.rows])
        return np.cumsum(per)

    # ---- final numbers for the table

    def final(self) -> dict[str, float | None]:
        s = self.summary
        fin = s.get("final", {})
        last = self.rows[-1] if self.rows else {}
        total = s.get("total", {})
        total_bytes = total.get("bytes")
        if total_bytes is None and self.rows:
            total_bytes = float(self.cum_bytes()[-1])
        sim = s.get("sim_time_s", last.get("sim_time_s"))
        egress = s.get("egress_cost_usd", last.get("egress_cost_usd"))
        if isinstance(egress, dict):
            egress = egress.get("total")
        out: dict[str, float | None] = {
            "val_token_acc": _num(fin.get("val_token_acc", last.get("val_token_acc"))),
            "val_ppl": _num(fin.get("val_ppl", last.get("val_ppl"))),
            "total_gb": None if total_bytes is None else float(total_bytes) / 1e9,
            "sim_time_s": _num(sim),
            "egress_usd": _num(egress),
            "wall_time_s": _num(s.get("wall_time_s")),
        }
        for key, value in sorted(total.items()):
            if key.startswith("compression_ratio"):
                out[key] = _num(value)
        return out


def _num(v: Any) -> float | None:
    if v is None or isinstance(v, (dict, list, str, bool)):
        return None
    f = float(v)
    return f if math.isfinite(f) else None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(f"{path}: not found (is {path.parent} a finished skyfed run directory?)") from None
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: invalid JSON at line {exc.lineno}: {exc.msg}") from None


def load_run(path: str | Path, label: str | None = None) -> RunData:
    """Read one run directory; `label` defaults to the config's `name`."""
    path = Path(path)
    if not path.is_dir():
        raise DataError(f"{path}: not a directory")
    summary = _read_json(path / "summary.json")
    config: dict[str, Any] = {}
    cfg_path = path / "config.yaml"
    if cfg_path.exists():
        try:
            config = yaml.safe_load(cfg_path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise DataError(f"{cfg_path}: invalid YAML: {exc}") from None
    rows: list[dict[str, Any]] = []
    metrics = path / "metrics.jsonl"
    if metrics.exists():
        for n, line in enumerate(metrics.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                raise DataError(f"{metrics} line {n}: invalid JSON") from None
    seed = config.get("seed")
    return RunData(path, label or str(config.get("name") or path.name), None if seed is None else int(seed), config, summary, rows)


@dataclass
class Group:
    """Runs of one label (seeds of one setting)."""

    label: str
    runs: list[RunData] = field(default_factory=list)

    def stats(self) -> dict[str, tuple[float, float, int] | None]:
        """metric -> (mean, std, n) over runs that have it; std is 0 for one run."""
        keys: list[str] = []
        finals = [r.final() for r in self.runs]
        for f in finals:
            keys += [k for k in f if k not in keys]
        out: dict[str, tuple[float, float, int] | None] = {}
        for k in keys:
            vals = [f[k] for f in finals if f.get(k) is not None]
            if not vals:
                out[k] = None
            else:
                arr = np.asarray(vals, dtype=float)
                out[k] = (float(arr.mean()), float(arr.std(ddof=1)) if len(arr) > 1 else 0.0, len(arr))
        return out


def group_runs(runs: Iterable[RunData]) -> list[Group]:
    """Group by label, in first-seen order; seeds are sorted within a group."""
    groups: dict[str, Group] = {}
    for run in runs:
        groups.setdefault(run.label, Group(run.label)).runs.append(run)
    for g in groups.values():
        g.runs.sort(key=lambda r: (r.seed is None, r.seed or 0, str(r.path)))
    return list(groups.values())


# ------------------------------------------------------------------ table

COLUMNS = [  # key, header, format (of the mean and of the std)
    ("val_token_acc", "next-token acc (%)", lambda v: f"{v * 100:.2f}"),
    ("val_ppl", "val perplexity", lambda v: f"{v:.2f}"),
    ("total_gb", "total GB", lambda v: f"{v:.4g}"),
    ("sim_time_s", "sim time (s)", lambda v: f"{v:.1f}"),
    ("egress_usd", "egress (USD)", lambda v: f"{v:.4g}"),
    ("wall_time_s", "wall time (s)", lambda v: f"{v:.1f}"),
]


def stat_cell(stat: tuple[float, float, int] | None, fmt) -> str:
    """A table cell for (mean, std, n): "mean ± std" with `fmt`, the mean alone for one run, "–" for none."""
    if stat is None:
        return "–"
    mean, std, n = stat
    if n == 1:
        return fmt(mean)
    return fmt(mean) + " ± " + ("0" if std <= 1e-6 * abs(mean) else fmt(std))  # e.g. header bytes differing


def comparison_table(groups: list[Group]) -> tuple[str, list[dict[str, Any]]]:
    """(Markdown table, the same numbers as dicts). Columns absent from every run are left out."""
    stats = [g.stats() for g in groups]
    ratio_keys = sorted({k for s in stats for k in s if k.startswith("compression_ratio")})
    cols = [c for c in COLUMNS if any(s.get(c[0]) is not None for s in stats)]
    header = ["run", "seeds", *[c[1] for c in cols], *[k.replace("compression_ratio", "compression ×").replace("_", " ") for k in ratio_keys]]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    records = []
    for g, s in zip(groups, stats):
        cells = [g.label, str(len(g.runs))]
        cells += [stat_cell(s.get(key), fmt) for key, _, fmt in cols]
        cells += [stat_cell(s.get(k), lambda v: f"{v:.1f}") for k in ratio_keys]
        lines.append("| " + " | ".join(cells) + " |")
        rec: dict[str, Any] = {"label": g.label, "seeds": [r.seed for r in g.runs], "runs": [str(r.path) for r in g.runs]}
        for k, v in s.items():
            rec[k] = None if v is None else {"mean": v[0], "std": v[1], "n": v[2]}
        records.append(rec)
    return "\n".join(lines) + "\n", records


# ------------------------------------------------------------------ plots


def _mean_curve(xs: list[np.ndarray], ys: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    n = min(len(y) for y in ys)
    x = np.mean([a[:n] for a in xs], axis=0)
    y = np.asarray([a[:n] for a in ys])
    return x, y.mean(axis=0), (y.std(axis=0, ddof=1) if len(ys) > 1 else np.zeros(n))


AXES = {
    "round": ("round", lambda r: r.rounds()),
    "bytes": ("cumulative bytes communicated, up + down (MB)", lambda r: r.cum_bytes() / 1e6),
    "simtime": ("simulated time (s)", lambda r: r.series("sim_time_s")),
}
METRICS = {
    "ppl": ("validation perplexity", "val_ppl", 1.0),
    "acc": ("next-token accuracy (%)", "val_token_acc", 100.0),
}


def plot_metric(groups: list[Group], axis: str, metric: str, out: Path, title: str) -> tuple[Path | None, str]:
    """One PNG: `metric` against `axis`, one curve (mean ± std band) per group.

    Returns (path or None, a note on what was left out)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xlabel, xfn = AXES[axis]
    ylabel, key, scale = METRICS[metric]
    skipped: list[str] = []
    curves = []
    for g in groups:
        xs, ys = [], []
        for run in g.runs:
            x, y = xfn(run), run.evaluated_series(key)
            if x is None or y is None or len(x) == 0:
                continue
            x, y = x[~np.isnan(y)], y[~np.isnan(y)]  # rounds that eval.interval did not evaluate
            if len(x) == 0:
                continue
            if axis == "bytes" and x[-1] <= 0:
                continue  # a centralized baseline communicates nothing
            xs.append(x)
            ys.append(y * scale)
        if xs:
            curves.append((g.label, *_mean_curve(xs, ys)))
        else:
            skipped.append(g.label)
    note = ""
    if skipped:
        what = {"bytes": "no bytes communicated", "simtime": "no simulated time"}.get(axis, "no per-round metrics")
        note = f"left out ({what}): {', '.join(skipped)}"
    if not curves:
        return None, note
    fig, ax = plt.subplots(figsize=PLOT_SIZE, dpi=PLOT_DPI)
    for label, x, mean, std in curves:
        (line,) = ax.plot(x, mean, marker="o", markersize=3, linewidth=1.5, label=label)
        if np.any(std > 0):
            ax.fill_between(x, mean - std, mean + std, color=line.get_color(), alpha=0.2, linewidth=0)
    if axis == "bytes":
        lo = min(float(c[1][0]) for c in curves)
        hi = max(float(c[1][-1]) for c in curves)
        if lo > 0 and hi / lo > 50:
            ax.set_xscale("log")
    if metric == "ppl":
        lo = min(float(c[2].min()) for c in curves)
        hi = max(float(c[2].max()) for c in curves)
        if lo > 0 and hi / lo > 10:
            ax.set_yscale("log")
    if axis == "round":
        from matplotlib.ticker import MaxNLocator

        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    path = out / f"{metric}_vs_{axis}.png"
    _finish(fig, ax, xlabel, ylabel, title, path)
    return path, note


def _finish(fig, ax, xlabel: str, ylabel: str, title: str, path: Path) -> None:
    """Labels, grid and legend, then save the figure small and close it."""
    import matplotlib.pyplot as plt

    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(textwrap.fill(title, 70), fontsize=10)  # long titles wrap instead of running off the figure
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=PLOT_DPI)
    plt.close(fig)


def plot_sweep(
    points: dict[str, list[tuple[float, float, float]]], xlabel: str, ylabel: str, path: Path, title: str, logx: bool = True
) -> Path:
    """A line per series of (x, mean, std) points, e.g. final perplexity against Dirichlet alpha."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=PLOT_SIZE, dpi=PLOT_DPI)
    for label, pts in points.items():
        pts = sorted(pts)
        ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts], marker="o", capsize=3, label=label)
    if logx:
        ax.set_xscale("log")
    _finish(fig, ax, xlabel, ylabel, title, path)
    return path


# ------------------------------------------------------------------ the report


def write_report(
    run_dirs: list[str | Path],
    out: str | Path,
    labels: list[str] | None = None,
    title: str = "skyfed report",
    extra_markdown: str = "",
) -> Path:
    """Write `out/report.md`, `out/report.json` and the PNG plots; returns the report path.

    `labels` gives one label per run directory (runs sharing a label are grouped)."""
    if not run_dirs:
        raise DataError("no run directories given")
    if labels is not None and len(labels) != len(run_dirs):
        raise DataError(f"--labels: {len(labels)} labels for {len(run_dirs)} run directories")
    runs = [load_run(p, labels[i] if labels else None) for i, p in enumerate(run_dirs)]
    groups = group_runs(runs)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    table, records = comparison_table(groups)
    lines = [f"# {title}", "", f"{len(runs)} runs in {len(groups)} groups (runs with the same label are seeds: mean ± std).", ""]
    lines += ["## Final results", "", table]
    lines += [
        "Accuracy and perplexity are the final evaluation on the validation split; total GB counts every byte "
        "sent both ways; compression × is fp32 bytes / bytes sent; sim time and egress come from the cloud "
        "profiles of a simulated run; wall time is this machine's.",
        "",
        "## Plots",
        "",
    ]
    notes = []
    for axis, axis_name in (("round", "round"), ("bytes", "bytes communicated"), ("simtime", "simulated time")):
        for metric in ("ppl", "acc"):
            mname = METRICS[metric][0]
            path, note = plot_metric(groups, axis, metric, out, f"{title}: {mname} vs {axis_name}")
            if path is None:
                notes.append(f"- no plot of {mname} vs {axis_name}: {note or 'no data'}")
                continue
            lines.append(f"![{mname} vs {axis_name}]({path.name})")
            lines.append("")
            if note:
                notes.append(f"- {mname} vs {axis_name}: {note}")
    if notes:
        lines += ["Notes:", "", *sorted(set(notes)), ""]
    if extra_markdown:
        lines += [extra_markdown, ""]
    lines += ["## Runs", "", *[f"- `{r.label}` seed {r.seed}: `{r.path}`" for r in runs], ""]
    report = out / "report.md"
    atomic_write_text(report, "\n".join(lines))
    atomic_write_text(out / "report.json", json.dumps({"title": title, "groups": records}, indent=2) + "\n")
    return report
