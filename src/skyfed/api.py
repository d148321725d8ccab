"""The Python API, for notebooks and scripts.

    import skyfed

    cfg = skyfed.load_config(preset="smoke", overrides={"federation.rounds": 3})
    result = skyfed.run(cfg, out="runs/try")          # the in-process simulation
    result.summary["final"]["val_ppl"], result.run_dir, result.metrics()[-1]

    skyfed.run(cfg, baseline="sync")                  # a centralized baseline
    skyfed.run(cfg, out="runs/try", resume=True)      # continue a stopped run exactly

A config comes from a YAML file, a named preset, a dict of sections (as a YAML file
holds them), or all three, with overrides on top (`{"train.lr": 1e-3}` or
`["train.lr=1e-3"]`). Errors are `skyfed.SkyfedError`s with one line saying what is
wrong and where. Progress goes to `on_event(kind, data)` if given (the CLI's progress
bar is one such sink); the library itself only logs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

from skyfed.config import ExperimentConfig
from skyfed.config import load_config as _load
from skyfed.data.corpus import check_data_paths
from skyfed.model_dir import check_model_path

EventSink = Callable[[str, dict[str, Any]], None]


@dataclass
class Result:
    """A finished run: its directory and the contents of its summary.json."""

    run_dir: Path
    summary: dict[str, Any]

    def metrics(self) -> list[dict[str, Any]]:
        """The run's metrics.jsonl, a dict per round."""
        path = self.run_dir / "metrics.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def load_config(
    config: str | Path | Mapping[str, Any] | ExperimentConfig | None = None,
    preset: str | None = None,
    overrides: Mapping[str, Any] | list[str] | None = None,
) -> ExperimentConfig:
    """A validated experiment config from a YAML path, a dict of sections or a config,
    on top of `preset` (default "default"), with `overrides` applied last."""
    if isinstance(overrides, Mapping):
        items: list = list(overrides.items())
    else:
        items = list(overrides or [])
    if isinstance(config, ExperimentConfig):
        return _load(None, preset, items, data=config.model_dump(mode="json"))
    if isinstance(config, Mapping):
        return _load(None, preset, items, data=dict(config))
    return _load(config, preset, items)


def run(
    config: str | Path | Mapping[str, Any] | ExperimentConfig | None = None,
    *,
    preset: str | None = None,
    overrides: Mapping[str, Any] | list[str] | None = None,
    out: str | Path | None = None,
    baseline: str | None = None,
    resume: bool = False,
    on_event: EventSink | None = None,
) -> Result:
    """Run an experiment (the runtime its config names) or a centralized `baseline`
    ("sync" or "sequential"); returns the run directory and the summary."""
    cfg = load_config(config, preset, overrides)
    # a wrong model.path or data.path fails here, before torch and transformers are imported (seconds)
    check_model_path(cfg.model.path, cfg.tokenizer.path)
    check_data_paths(cfg.data.path, cfg.data.valid_path)
    if baseline is not None:
        from skyfed.baselines import run_baseline

        run_dir, summary = run_baseline(cfg, baseline, out, on_event)
    else:
        from skyfed.runtime.simulation import run_simulation

        run_dir, summary = run_simulation(cfg, out, on_event, resume=resume)
    return Result(Path(run_dir.path), summary)
