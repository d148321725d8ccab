"""The `skyfed` command: parse, call the library, print. Errors become one line and exit 2."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console

from skyfed.errors import SkyfedError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Federated training of language models across clouds.")
console = Console(stderr=False)
err_console = Console(stderr=True)


def fail(message: str) -> None:
    err_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(2)


@app.command()
def run(
    config: Optional[Path] = typer.Argument(None, help="experiment YAML (default: the three-cloud preset)"),
    preset: Optional[str] = typer.Option(None, "--preset", "-p", help="named experiment preset"),
    set_: list[str] = typer.Option([], "--set", help="override a config key, e.g. --set train.lr=0.001"),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="run directory (default runs/NAME-TIME)"),
    baseline: Optional[str] = typer.Option(None, "--baseline", help="centralized baseline instead: sync | sequential"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bar"),
    resume: bool = typer.Option(False, "--resume", help="continue the stopped run in --out exactly where it left off"),
) -> None:
    """Run a federated experiment in simulation (or a centralized baseline)."""
    from skyfed.api import run as run_experiment
    from skyfed.ui import ProgressView, print_summary

    if resume and baseline is not None:
        fail("--resume works for federated runs, not for --baseline")
    view = ProgressView(console, enabled=not quiet)
    with view:
        result = run_experiment(config, preset=preset, overrides=set_, out=out, baseline=baseline, resume=resume,
                                on_event=view.handle)
    print_summary(console, result.run_dir, result.summary)


@app.command()
def partition(
    config: Optional[Path] = typer.Argument(None, help="experiment YAML (default: the three-cloud preset)"),
    preset: Optional[str] = typer.Option(None, "--preset", "-p", help="named experiment preset"),
    set_: list[str] = typer.Option([], "--set", help="override a config key, e.g. --set data.partition.alpha=0.1"),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="output folder (default OUT_DIR/NAME-partition)"),
) -> None:
    """Split the corpus across the clients; write the shards, partition.json and partition.png."""
    from skyfed.config import load_config

    cfg = load_config(config, preset, set_)
    from skyfed.partition_report import partition_table  # the runtime (torch) once the config is valid
    from skyfed.runtime.partitioning import write_partition
    from skyfed.runtime.setup import prepare_data

    data = prepare_data(cfg)
    if data.partition is None:
        fail("every client has its own data (federation.clients[].data): there is nothing to partition")
    folder = out or Path(cfg.out_dir) / f"{cfg.name}-partition"
    files = write_partition(data.partition, folder)
    console.print(partition_table(data.partition.stats))
    console.print(f"shards, {files['report'].name} and {files['plot'].name} in {folder}")


@app.command()
def calibrate(
    config: Optional[Path] = typer.Argument(None, help="experiment YAML (default: the three-cloud preset)"),
    preset: Optional[str] = typer.Option(None, "--preset", "-p", help="named experiment preset"),
    set_: list[str] = typer.Option([], "--set", help="override a config key"),
    steps: int = typer.Option(10, "--steps", min=1, help="timed local training steps"),
) -> None:
    """Time real local steps of the experiment's model here; print clouds.reference_tokens_per_s."""
    from skyfed.config import load_config

    cfg = load_config(config, preset, set_)
    from skyfed.runtime.calibrate import measure_tokens_per_s  # the runtime (torch) once the config is valid

    m = measure_tokens_per_s(cfg, steps)
    console.print(f"{m['tokens_per_s']:.0f} tokens/s over {m['steps']} steps on {m['device']} ({m['seconds']:.2f} s)")
    console.print(f"use it as the speed-1.0 reference: --set clouds.reference_tokens_per_s={m['tokens_per_s']:.0f}")


@app.command()
def presets() -> None:
    """List experiment presets and model presets."""
    from rich.table import Table

    from skyfed.config import PRESETS
    from skyfed.model import MODEL_PRESETS

    table = Table(title="experiment presets (--preset)")
    table.add_column("name")
    table.add_column("description")
    for name, fn in PRESETS.items():
        table.add_row(name, (fn.__doc__ or "").strip().splitlines()[0])
    console.print(table)
    models = Table(title="model presets (model.preset)")
    models.add_column("name")
    models.add_column("description")
    for name, (desc, _) in MODEL_PRESETS.items():
        models.add_row(name, desc)
    console.print(models)


@app.command()
def strategies() -> None:
    """List aggregation strategies (federation.strategy.name) with the paper each comes from."""
    from rich.table import Table

    from skyfed.federation.strategies import STRATEGIES, yaml_params

    table = Table(title="strategies (federation.strategy.name)")
    for col in ("name", "description", "paper", "params"):
        table.add_column(col)
    for name, cls in STRATEGIES.items():
        table.add_row(name + (" (async)" if cls.asynchronous else ""), cls.description, cls.paper, ", ".join(yaml_params(cls)))
    console.print(table)


@app.command()
def generate(
    model_dir: Path = typer.Argument(..., help="a run's model/ directory"),
    prompt: str = typer.Option("The", "--prompt", help="text to continue"),
    max_new_tokens: int = typer.Option(60, "--max-new-tokens"),
    temperature: float = typer.Option(0.8, "--temperature"),
    seed: int = typer.Option(0, "--seed"),
) -> None:
    """Sample text from a trained model directory."""
    from skyfed.generate import sample_text

    console.print(sample_text(model_dir, prompt, max_new_tokens, temperature, seed), highlight=False)


@app.command()
def report(
    run_dirs: list[Path] = typer.Argument(..., help="run directories (each with summary.json, metrics.jsonl, config.yaml)"),
    out: Path = typer.Option(..., "--out", "-o", help="folder for report.md and the PNG plots"),
    labels: Optional[str] = typer.Option(None, "--labels", help="comma-separated label per run (default: config name); equal labels = seeds"),
    title: str = typer.Option("skyfed report", "--title"),
) -> None:
    """Compare runs: a Markdown table (mean ± std over seeds) and PNG plots."""
    from skyfed.report import write_report

    names = [s.strip() for s in labels.split(",")] if labels else None
    console.print(f"report: {write_report(run_dirs, out, names, title)}")


@app.command()
def suite(
    name: str = typer.Argument(..., help="a suite in configs/suites/ (e.g. paper) or a manifest YAML path"),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="output folder (default runs/suite-NAME[-quick])"),
    quick: bool = typer.Option(False, "--quick", help="smoke-sized runs, one seed (CI)"),
    seeds: Optional[int] = typer.Option(None, "--seeds", help="override every experiment's number of seeds"),
    only: list[str] = typer.Option([], "--only", help="run only these experiments"),
    dry_run: bool = typer.Option(False, "--dry-run", help="list the runs and their local steps; run nothing"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bar"),
) -> None:
    """Run an experiment suite (runs already finished are skipped), then report each experiment."""
    from skyfed.suite import load_suite, run_suite
    from skyfed.ui_suite import SuiteProgress, print_plan

    spec = load_suite(name)
    if dry_run:
        print_plan(console, spec, out, quick, seeds, only or None)
        return
    with SuiteProgress(console, enabled=not quiet) as view:
        reports = run_suite(spec, out, quick=quick, seeds=seeds, only=only or None, on_event=view.handle)
    for exp, path in reports.items():
        console.print(f"{exp}: {path}")


from skyfed.runtime.grpc.commands import add_commands as _add_deployment_commands  # noqa: E402

_add_deployment_commands(app)  # skyfed server / client / certs


def main(argv: list[str] | None = None) -> Any:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        return app(args=argv, standalone_mode=True)
    except SkyfedError as exc:
        err_console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
