"""Experiment suites: many runs from one manifest, resumable, each experiment reported.

    skyfed suite paper                 # configs/suites/paper.yaml, into runs/suite-paper/
    skyfed suite paper --quick         # smoke-sized, one seed: CI
    skyfed suite path/to/suite.yaml --out out/ --seeds 1 --dry-run

A manifest (YAML) names experiments; each experiment is a base config (optional YAML
`config`, relative to the manifest, on top of a `preset`) with experiment-wide `set`
overrides, a mapping of `variants` (label -> list of `--set` overrides), optional
centralized `baselines` (sync | sequential), an optional `sweep` (one config key over
a list of values, crossed with the variants) and a number of `seeds`. Override order:
preset <- config file <- suite `defaults.set` <- experiment `set` <- variant <- sweep
value <- (`--quick`: the manifest's `quick.set`) <- seed and name.

A run whose `summary.json` exists is skipped, so a crashed or interrupted suite picks
up where it stopped (an unfinished run directory is started again from scratch).
After its runs, each experiment gets `OUT/<experiment>/report.md` (see `report.py`).
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

from skyfed.config import ExperimentConfig, load_config
from skyfed.errors import ConfigError

log = logging.getLogger(__name__)

EventSink = Callable[[str, dict[str, Any]], None]
SUITES_DIR = Path(__file__).resolve().parents[2] / "configs" / "suites"
BASELINE_KINDS = ("sync", "sequential")


@dataclass
class Sweep:
    key: str
    values: list[Any]
    label: str
    log_scale: bool = True


@dataclass
class Experiment:
    name: str
    title: str
    preset: str | None
    config: Path | None
    set: list[str]
    variants: dict[str, list[str]]
    baselines: list[str]
    seeds: int
    sweep: Sweep | None = None


@dataclass
class SuiteSpec:
    name: str
    path: Path
    description: str
    experiments: list[Experiment]
    seed: int = 0
    quick_preset: str | None = "smoke"
    quick_set: list[str] = field(default_factory=list)


@dataclass
class PlannedRun:
    experiment: str
    label: str  # groups seeds in the report
    seed: int
    dir: Path
    baseline: str | None
    overrides: list[str]
    sweep_value: Any = None
    variant: str = ""


def _as_list(value: Any, where: str) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{where}: expected a list of KEY=VALUE strings")
    return list(value)


def load_suite(name_or_path: str | Path) -> SuiteSpec:
    """A manifest by path, or by name from configs/suites/NAME.yaml (cwd first, then the repo)."""
    candidates = [Path(name_or_path), Path("configs/suites") / f"{name_or_path}.yaml", SUITES_DIR / f"{name_or_path}.yaml"]
    path = next((p for p in candidates if p.is_file()), None)
    if path is None:
        known = sorted(p.stem for p in SUITES_DIR.glob("*.yaml")) if SUITES_DIR.is_dir() else []
        raise ConfigError(f"suite {str(name_or_path)!r} not found (a manifest path, or one of: {', '.join(known) or 'none'})")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML: {exc}") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("experiments"), dict) or not raw["experiments"]:
        raise ConfigError(f"{path}: a suite needs a mapping `experiments:` with at least one experiment")
    defaults = raw.get("defaults") or {}
    quick = raw.get("quick") or {}
    experiments = []
    for name, e in raw["experiments"].items():
        where = f"{path}: experiments.{name}"
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", str(name)):
            raise ConfigError(f"{where}: experiment names may use letters, digits, _ . - only")
        e = e or {}
        unknown = set(e) - {"title", "preset", "config", "set", "variants", "baselines", "seeds", "sweep"}
        if unknown:
            raise ConfigError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}")
        variants = e.get("variants") or {}
        if not isinstance(variants, dict):
            raise ConfigError(f"{where}.variants: expected a mapping label -> list of overrides")
        baselines = e.get("baselines") or []
        for b in baselines:
            if b not in BASELINE_KINDS:
                raise ConfigError(f"{where}.baselines: unknown baseline {b!r}; choose from {', '.join(BASELINE_KINDS)}")
        if not variants and not baselines:
            raise ConfigError(f"{where}: no variants and no baselines")
        sweep = None
        if e.get("sweep"):
            s = e["sweep"]
            if not isinstance(s, dict) or "key" not in s or not isinstance(s.get("values"), list) or not s["values"]:
                raise ConfigError(f"{where}.sweep: expected {{key: a.b.c, values: [...]}}")
            sweep = Sweep(s["key"], s["values"], s.get("label", s["key"].split(".")[-1]), bool(s.get("log_scale", True)))
        config = e.get("config", defaults.get("config"))
        experiments.append(Experiment(
            name=str(name),
            title=str(e.get("title", name)),
            preset=e.get("preset", defaults.get("preset")),
            config=None if config is None else (path.parent / config),
            set=_as_list(defaults.get("set"), f"{path}: defaults.set") + _as_list(e.get("set"), f"{where}.set"),
            variants={str(k): _as_list(v, f"{where}.variants.{k}") for k, v in variants.items()},
            baselines=list(baselines),
            seeds=int(e.get("seeds", defaults.get("seeds", 1))),
            sweep=sweep,
        ))
    return SuiteSpec(
        name=str(raw.get("name", path.stem)), path=path, description=str(raw.get("description", "")),
        experiments=experiments, seed=int(defaults.get("seed", 0)),
        quick_preset=quick.get("preset", "smoke"), quick_set=_as_list(quick.get("set"), f"{path}: quick.set"),
    )


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_")


def plan_suite(
    spec: SuiteSpec, out: Path, quick: bool = False, seeds: int | None = None, only: list[str] | None = None
) -> list[PlannedRun]:
    """Every run of the suite, in order, with its directory and overrides."""
    if only:
        unknown = set(only) - {e.name for e in spec.experiments}
        if unknown:
            raise ConfigError(f"--only: unknown experiment(s) {', '.join(sorted(unknown))}; the suite has "
                              f"{', '.join(e.name for e in spec.experiments)}")
    plan: list[PlannedRun] = []
    for exp in spec.experiments:
        if only and exp.name not in only:
            continue
        n_seeds = 1 if quick else (seeds or exp.seeds)
        entries: list[tuple[str, str, str | None, list[str], Any]] = []
        sweep_values = exp.sweep.values if exp.sweep else [None]
        for value in sweep_values:
            suffix = "" if value is None else f" {exp.sweep.label}={value}"
            extra = [] if value is None else [f"{exp.sweep.key}={json.dumps(value)}"]
            for variant, overrides in exp.variants.items():
                entries.append((variant, variant + suffix, None, overrides + extra, value))
            for kind in exp.baselines:
                entries.append((f"baseline-{kind}", f"baseline-{kind}" + suffix, kind, extra, value))
        for variant, label, baseline, overrides, value in entries:
            for i in range(n_seeds):
                seed = spec.seed + i
                plan.append(PlannedRun(
                    experiment=exp.name, label=label, seed=seed, baseline=baseline, sweep_value=value, variant=variant,
                    dir=out / exp.name / "runs" / f"{_slug(label)}-s{seed}",
                    overrides=[*exp.set, *overrides, *(spec.quick_set if quick else []), f"seed={seed}", f"name={json.dumps(label)}"],
                ))
    return plan


def resolve(spec: SuiteSpec, run: PlannedRun, quick: bool) -> ExperimentConfig:
    exp = next(e for e in spec.experiments if e.name == run.experiment)
    preset = spec.quick_preset if quick and spec.quick_preset else exp.preset
    try:
        return load_config(exp.config, preset, run.overrides)
    except ConfigError as exc:
        raise ConfigError(f"suite {spec.name}, experiment {run.experiment}, run {run.label!r}: {exc}") from None


def local_steps(cfg: ExperimentConfig) -> int:
    """Local training steps of a run (clients x rounds x steps): the suite's cost model."""
    return len(cfg.federation.clients) * cfg.federation.rounds * cfg.train.local_steps


def run_suite(
    spec: SuiteSpec,
    out: str | Path | None = None,
    quick: bool = False,
    seeds: int | None = None,
    only: list[str] | None = None,
    on_event: EventSink | None = None,
) -> dict[str, Path]:
    """Run (or resume) the suite; returns experiment -> report.md path."""
    emit = on_event or (lambda kind, data: None)
    out = Path(out or Path("runs") / f"suite-{spec.name}{'-quick' if quick else ''}")
    plan = plan_suite(spec, out, quick, seeds, only)
    configs = [resolve(spec, r, quick) for r in plan]  # every config is checked before any run starts
    emit("suite_start", {"runs": len(plan), "local_steps": sum(local_steps(c) for c in configs), "out": str(out)})
    for run, cfg in zip(plan, configs):
        info = {"experiment": run.experiment, "run": run.dir.name, "rounds": cfg.federation.rounds}
        if (run.dir / "summary.json").exists():
            emit("suite_run_done", {**info, "skipped": True})
            continue
        if run.dir.exists():
            log.warning("%s: unfinished run directory, starting it again", run.dir)
            shutil.rmtree(run.dir)
        emit("suite_run", info)
        started = time.perf_counter()
        if run.baseline:
            from skyfed.baselines import run_baseline

            _, summary = run_baseline(cfg, run.baseline, run.dir, emit)
        else:
            from skyfed.runtime.simulation import run_simulation

            _, summary = run_simulation(cfg, run.dir, emit)
        emit("suite_run_done", {**info, "skipped": False, "val_ppl": summary["final"]["val_ppl"],
                                "wall_time_s": time.perf_counter() - started})
    return write_reports(spec, out, plan, quick)


def write_reports(spec: SuiteSpec, out: Path, plan: list[PlannedRun], quick: bool = False) -> dict[str, Path]:
    from skyfed.report import load_run, plot_sweep, write_report

    reports: dict[str, Path] = {}
    index = {"suite": spec.name, "manifest": str(spec.path), "quick": quick, "experiments": {}}
    for exp in spec.experiments:
        runs = [r for r in plan if r.experiment == exp.name]
        if not runs:
            continue
        exp_dir = out / exp.name
        extra = ""
        if exp.sweep is not None:
            extra = _sweep_section(exp, runs, exp_dir, load_run, plot_sweep)
        reports[exp.name] = write_report([r.dir for r in runs], exp_dir, [r.label for r in runs], exp.title, extra)
        index["experiments"][exp.name] = {
            "title": exp.title, "report": str(reports[exp.name]),
            "runs": [{"label": r.label, "seed": r.seed, "dir": str(r.dir)} for r in runs],
        }
    (out / "suite.json").write_text(json.dumps(index, indent=2) + "\n")
    return reports


def _sweep_section(exp: Experiment, runs: list[PlannedRun], exp_dir: Path, load_run, plot_sweep) -> str:
    import numpy as np

    exp_dir.mkdir(parents=True, exist_ok=True)
    by: dict[str, dict[Any, list[dict[str, Any]]]] = {}
    for r in runs:
        by.setdefault(r.variant, {}).setdefault(r.sweep_value, []).append(load_run(r.dir).final())
    lines = [f"## Sweep over {exp.sweep.label} (`{exp.sweep.key}`)", ""]
    for key, ylabel, scale, fname in (("val_ppl", "final validation perplexity", 1.0, "sweep_ppl.png"),
                                      ("val_token_acc", "final next-token accuracy (%)", 100.0, "sweep_acc.png")):
        points = {}
        for variant, values in by.items():
            pts = []
            for v, finals in values.items():
                arr = np.asarray([f[key] for f in finals if f.get(key) is not None], dtype=float) * scale
                if len(arr) and isinstance(v, (int, float)):
                    pts.append((float(v), float(arr.mean()), float(arr.std(ddof=1)) if len(arr) > 1 else 0.0))
            if pts:
                points[variant] = pts
        if points:
            plot_sweep(points, exp.sweep.label, ylabel, exp_dir / fname, f"{exp.title}: {ylabel} vs {exp.sweep.label}",
                       exp.sweep.log_scale)
            lines += [f"![{ylabel} vs {exp.sweep.label}]({fname})", ""]
    return "\n".join(lines)
