"""Console progress for `skyfed suite`: one bar over the suite's runs, one over the
current run's rounds. The suite emits events; only the CLI prints."""

from __future__ import annotations

from typing import Any

from rich.console import Console

from skyfed.ui import ConsoleProgress


class SuiteProgress(ConsoleProgress):
    def __init__(self, console: Console, enabled: bool = True):
        super().__init__(console, enabled)
        self.suite_task = None
        self.round_task = None

    def handle(self, kind: str, data: dict[str, Any]) -> None:
        if not self.enabled:
            return
        p = self.progress
        if kind == "suite_start":
            self.suite_task = p.add_task("suite", total=data["runs"])
            self.round_task = p.add_task("rounds", total=1)
        elif kind == "suite_run":
            p.update(self.suite_task, description=f"{data['experiment']}/{data['run']}")
            p.update(self.round_task, completed=0, total=data.get("rounds", 1))
        elif kind == "suite_run_done":
            p.advance(self.suite_task)
            if data.get("skipped"):
                p.console.log(f"skip {data['experiment']}/{data['run']} (summary.json exists)")
            else:
                p.console.log(f"done {data['experiment']}/{data['run']}: val ppl {data['val_ppl']:.2f}, {data['wall_time_s']:.0f} s")
        elif kind == "suite_report":
            p.console.log(f"report {data['experiment']}: {data['path']}")
        elif kind == "round_end":
            p.advance(self.round_task)
        elif kind == "local_step":
            p.update(self.round_task, description=f"{data['client']} step {data['step']}/{data['steps']}")


def print_plan(console: Console, spec, out, quick: bool, seeds: int | None, only: list[str] | None) -> None:
    """The runs a suite would make, with local steps per run (the cost model) and a total."""
    from pathlib import Path

    from rich.table import Table

    from skyfed.suite import local_steps, plan_suite, resolve

    out = Path(out or Path("runs") / f"suite-{spec.name}{'-quick' if quick else ''}")
    plan = plan_suite(spec, out, quick, seeds, only)
    table = Table(title=f"suite {spec.name}{' (quick)' if quick else ''}: {len(plan)} runs")
    for col in ("experiment", "run", "seed", "model", "rounds x steps x clients", "local steps", "done"):
        table.add_column(col)
    total = 0
    for run in plan:
        cfg = resolve(spec, run, quick)
        n = local_steps(cfg)
        total += n
        table.add_row(run.experiment, run.label, str(run.seed), cfg.model.preset,
                      f"{cfg.federation.rounds} x {cfg.train.local_steps} x {len(cfg.federation.clients)}", str(n),
                      "yes" if (run.dir / "summary.json").exists() else "")
    console.print(table)
    console.print(f"total local steps: {total:,}")
