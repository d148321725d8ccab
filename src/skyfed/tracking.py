"""Experiment tracking: every round's metrics, the config and the summary to TensorBoard and MLflow.

    logging: [tensorboard, mlflow]          # in the experiment YAML
    tracking: {tracking_uri: http://mlflow.internal:5000, experiment: three-clouds}   # optional

`make_trackers(cfg, run_dir)` builds one engine observer per entry of `logging`. Each one
receives the record of every metrics.jsonl line (its numeric fields, flattened with "/":
``train_loss/aws``, ``staleness/mean``; booleans, strings, lists and non-finite values
are left out) at step = the round, the config once as parameters, and the final
summary at `close(summary)`:

- TensorBoard: event files in RUN_DIR/tensorboard/ (torch.utils.tensorboard), the config
  as HParams and as a text summary, the summary's numbers under ``summary/``.
- MLflow: a run named after the run directory, in a SQLite store RUN_DIR/mlflow.db with
  artifacts in RUN_DIR/mlflow-artifacts/ unless `tracking.tracking_uri` says otherwise;
  config.yaml and summary.json as artifacts. A resumed run directory continues the same
  MLflow run (its id is kept in RUN_DIR/mlflow_run.json).

The libraries are imported only when configured; a missing one is a ConfigError that
says what to install. metrics.jsonl stays the record `skyfed report` reads.
"""

from __future__ import annotations

import atexit
import json
import logging
import math
import re
import time
from pathlib import Path
from typing import Any

from skyfed.config import ExperimentConfig, dump_config
from skyfed.errors import ConfigError

log = logging.getLogger(__name__)

_KEY_CHARS = re.compile(r"[^A-Za-z0-9_\-. /:]")
_PARAM_MAX = 500  # characters of one parameter value (MLflow's limit is larger; a long list reads badly)


def flatten_numbers(tree: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """{"a/b": 1.0} for every finite int or float leaf of nested dicts (not bools, not lists)."""
    out: dict[str, float] = {}
    for key, value in tree.items():
        name = _KEY_CHARS.sub("_", f"{prefix}{key}")
        if isinstance(value, dict):
            out.update(flatten_numbers(value, name + "/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            out[name] = float(value)
    return out


def flatten_params(tree: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """{"train.lr": "0.0003"}: every config leaf as text (lists as JSON), dotted like --set."""
    out: dict[str, str] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten_params(value, name + "."))
        else:
            text = value if isinstance(value, str) else json.dumps(value)
            out[_KEY_CHARS.sub("_", name)] = text if len(text) <= _PARAM_MAX else text[: _PARAM_MAX - 3] + "..."
    return out


def _missing(package: str, what: str) -> ConfigError:
    return ConfigError(f"logging: {what} needs the '{package}' package (pip install 'skyfed[ops]')")


class TensorBoardTracker:
    """Scalars per round in RUN_DIR/tensorboard/, the config as HParams and text."""

    def __init__(self, cfg: ExperimentConfig, run_dir: Path):
        try:
            from torch.utils.tensorboard import SummaryWriter
            from torch.utils.tensorboard.summary import hparams
        except ImportError:
            raise _missing("tensorboard", "tensorboard") from None
        self.log_dir = Path(run_dir) / "tensorboard"
        self.writer = SummaryWriter(log_dir=str(self.log_dir))
        params = flatten_params(cfg.model_dump(mode="json"))
        for summary in hparams(params, {"val_ppl": 0.0, "val_loss": 0.0}):
            self.writer.file_writer.add_summary(summary)
        self.writer.add_text("config", "    " + dump_config(cfg).replace("\n", "\n    "))  # markdown code block
        self.writer.flush()
        self.last_round = 0

    def round_start(self, round: int) -> None:
        pass

    def round_end(self, round: int, record: dict[str, Any], outcome: Any) -> dict[str, Any]:
        for tag, value in flatten_numbers(record).items():
            self.writer.add_scalar(tag, value, global_step=round)
        self.writer.flush()  # every round on disk: a crash loses nothing logged
        self.last_round = round
        return {}

    def close(self, summary: dict[str, Any] | None) -> None:
        if summary is not None:
            for tag, value in flatten_numbers(summary, "summary/").items():
                self.writer.add_scalar(tag, value, global_step=self.last_round)
        self.writer.close()


class MLflowTracker:
    """One MLflow run per run directory: params, per-round metrics, artifacts, status."""

    def __init__(self, cfg: ExperimentConfig, run_dir: Path):
        try:
            from mlflow import MlflowClient
        except ImportError:
            raise _missing("mlflow", "mlflow") from None
        run_dir = Path(run_dir).resolve()
        default = cfg.tracking.tracking_uri is None
        self.tracking_uri = f"sqlite:///{run_dir / 'mlflow.db'}" if default else cfg.tracking.tracking_uri
        self.client = MlflowClient(tracking_uri=self.tracking_uri)
        experiment = cfg.tracking.experiment or cfg.name
        found = self.client.get_experiment_by_name(experiment)
        if found is not None:
            experiment_id = found.experiment_id
        else:
            artifacts = (run_dir / "mlflow-artifacts").as_uri() if default else None
            experiment_id = self.client.create_experiment(experiment, artifact_location=artifacts)
        marker = run_dir / "mlflow_run.json"
        previous = json.loads(marker.read_text()) if marker.exists() else {}
        if previous.get("tracking_uri") == self.tracking_uri:  # a resumed run directory
            self.run_id = previous["run_id"]
            self.client.update_run(self.run_id, status="RUNNING")
        else:
            self.run_id = self.client.create_run(experiment_id, run_name=run_dir.name).info.run_id
            marker.write_text(json.dumps({"tracking_uri": self.tracking_uri, "run_id": self.run_id}) + "\n")
            self._log(params=flatten_params(cfg.model_dump(mode="json")))
            self.client.log_text(self.run_id, dump_config(cfg), "config.yaml")
        self.last_round = 0
        self._closed = False
        atexit.register(self._abandoned)
        log.info("mlflow: run %s at %s", self.run_id, self.tracking_uri)

    def _log(self, metrics: dict[str, float] | None = None, step: int = 0, params: dict[str, str] | None = None) -> None:
        from mlflow.entities import Metric, Param

        now = int(time.time() * 1000)
        ms = [Metric(k, v, now, step) for k, v in (metrics or {}).items()]
        ps = [Param(k, v) for k, v in (params or {}).items()]
        for i in range(0, len(ms), 1000):  # MLflow's batch limits
            self.client.log_batch(self.run_id, metrics=ms[i : i + 1000])
        for i in range(0, len(ps), 100):
            self.client.log_batch(self.run_id, params=ps[i : i + 100])

    def round_start(self, round: int) -> None:
        pass

    def round_end(self, round: int, record: dict[str, Any], outcome: Any) -> dict[str, Any]:
        self._log(metrics=flatten_numbers(record), step=round)
        self.last_round = round
        return {}

    def close(self, summary: dict[str, Any] | None) -> None:
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self._abandoned)
        if summary is not None:
            self._log(metrics=flatten_numbers(summary, "summary/"), step=self.last_round)
            self.client.log_dict(self.run_id, summary, "summary.json")
        self.client.set_terminated(self.run_id, "FINISHED" if summary is not None else "FAILED")

    def _abandoned(self) -> None:
        """At exit without close() (the run raised): mark the MLflow run failed, not running."""
        if not self._closed:
            self._closed = True
            try:
                self.client.set_terminated(self.run_id, "FAILED")
            except Exception:  # the store may be gone at exit; the run then stays RUNNING
                pass


TRACKERS = {"tensorboard": TensorBoardTracker, "mlflow": MLflowTracker}


def make_trackers(cfg: ExperimentConfig, run_dir: Any) -> list[Any]:
    """One engine observer per entry of `cfg.logging` (run_dir: a RunDir or a path)."""
    path = Path(getattr(run_dir, "path", run_dir))
    return [TRACKERS[name](cfg, path) for name in dict.fromkeys(cfg.logging)]


def close_trackers(trackers: list[Any], summary: dict[str, Any] | None) -> None:
    """Write the final summary (None: the run failed) and close every tracker."""
    for tracker in trackers:
        tracker.close(summary)
