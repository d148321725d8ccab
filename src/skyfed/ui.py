"""Console rendering of run events: a progress bar over rounds and local steps, and
the summary table. The library emits events; only the CLI prints."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table


class ConsoleProgress:
    """A rich progress display: a context manager that can be switched off (--quiet)."""

    def __init__(self, console: Console, enabled: bool = True):
        self.console = console
        self.enabled = enabled
        self.progress = Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
            TimeElapsedColumn(), TimeRemainingColumn(), console=console, disable=not enabled,
        )

    def __enter__(self):
        self.progress.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.progress.__exit__(*exc)


class ProgressView(ConsoleProgress):
    """Rounds and local steps of one run."""

    def __init__(self, console: Console, enabled: bool = True):
        super().__init__(console, enabled)
        self.rounds = None
        self.steps = None

    def handle(self, kind: str, data: dict[str, Any]) -> None:
        if not self.enabled:
            return
        if kind == "status":
            self.progress.console.log(data["message"])
        elif kind == "start":
            if "params" in data:
                self.progress.console.log(
                    f"{len(data.get('clients', []))} clients, {data['params']:,} parameters, run dir {data.get('run_dir', '')}"
                )
            self.rounds = self.progress.add_task("rounds", total=data["rounds"])
            self.steps = self.progress.add_task("local steps", total=1)
        elif kind == "round_start":
            self.progress.update(self.rounds, description=f"round {data['round'] + 1}")
        elif kind == "local_step":
            self.progress.update(self.steps, completed=data["step"], total=data["steps"],
                                 description=f"{data['client']} loss {data['loss']:.3f}")
        elif kind == "round_end":
            self.progress.advance(self.rounds)
            self.progress.console.log(
                f"round {data['round'] + 1}: "
                + (f"val ppl {data['val_ppl']:.1f}, acc {data['val_token_acc']:.3f}, " if "val_ppl" in data else "not evaluated, ")
                + f"up {data['bytes_up'] / 1e6:.2f} MB, down {data['bytes_down'] / 1e6:.2f} MB"
                + (f", sim {data['sim_time_s']:.2f} s, egress ${data['egress_cost_usd']['total']:.4f}" if "sim_time_s" in data else "")
                + (f", missing {data['missing']}" if data.get("missing") else "")
                + (f", rejected {list(data['rejected'])}" if data.get("rejected") else "")
            )


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.2f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return str(n)


def _fmt_seconds(s: float) -> str:
    if s < 120:
        return f"{s:.2f} s"
    if s < 7200:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.2f} h"


def print_summary(console: Console, run_dir: Path, summary: dict[str, Any]) -> None:
    table = Table(title=f"skyfed run: {run_dir}", show_header=True)
    table.add_column("metric")
    table.add_column("value", justify="right")
    final = summary["final"]
    rows = [
        ("mode", str(summary.get("mode", ""))),
        ("rounds", str(summary["rounds"])),
        ("validation loss", f"{final['val_loss']:.4f}"),
        ("validation perplexity", f"{final['val_ppl']:.2f}"),
        ("next-token accuracy", f"{final['val_token_acc'] * 100:.2f}%"),
        ("unigram perplexity", f"{summary['unigram_ppl']:.2f}"),
        ("perplexity / unigram", f"{summary['ppl_vs_unigram']:.3f}"),
        ("bytes up", _fmt_bytes(summary["total"]["bytes_up"])),
        ("bytes down", _fmt_bytes(summary["total"]["bytes_down"])),
        ("wall time", f"{summary['wall_time_s']:.1f} s"),
    ]
    if summary.get("runtime") == "ray":  # clients trained by Ray actors
        rows.append(("Ray actors", str(summary.get("ray_actors"))))
    if "sim_time_s" in summary:  # the simulated clouds (skyfed.clouds)
        rows.append(("simulated time", _fmt_seconds(summary["sim_time_s"])))
        cost = summary.get("egress_cost_usd", {})
        per_cloud = ", ".join(f"{c} ${v:.4f}" for c, v in cost.items() if c != "total")
        rows.append(("egress cost", f"${cost.get('total', 0.0):.4f}" + (f" ({per_cloud})" if per_cloud else "")))
    if "epsilon" in summary:  # differential privacy (skyfed.security)
        privacy = summary.get("privacy", {})
        level = "client-level" if "client" in privacy else "document-level, largest cloud"
        rows.append(("epsilon", f"{summary['epsilon']:.3g} at delta {privacy.get('delta', float('nan')):g} ({level})"))
    for name, value in rows:
        table.add_row(name, value)
    console.print(table)
    console.print(f"model: {run_dir / 'model'}  (AutoModelForCausalLM.from_pretrained)")
    if (Path(run_dir) / "adapter").is_dir():
        console.print(f"adapter: {Path(run_dir) / 'adapter'}  (PeftModel.from_pretrained)")
