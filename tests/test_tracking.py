"""`logging: [tensorboard, mlflow]`: a real `skyfed run` read back with each library's own reader.

Every metrics.jsonl line's numeric fields must be in TensorBoard (EventAccumulator) and in
MLflow (MlflowClient) at step = its round, with the config as parameters and the summary.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import ROOT, run_cli
from skyfed.config import load_config
from skyfed.errors import ConfigError
from skyfed.tracking import flatten_numbers, flatten_params, make_trackers


def test_flatten_numbers_keeps_finite_numbers_only():
    record = {"round": 3, "aggregated": True, "val_ppl": 12.5, "train_loss": {"aws": 2.0, "gcp": None},
              "staleness": {"mean": 0.5, "values": [0, 1]}, "slowest_client": "aws", "bad": float("nan"),
              "odd name!": 1}
    assert flatten_numbers(record) == {"round": 3.0, "val_ppl": 12.5, "train_loss/aws": 2.0,
                                       "staleness/mean": 0.5, "odd name_": 1.0}


def test_flatten_params_is_dotted_like_set():
    params = flatten_params(load_config(None, "smoke", []).model_dump(mode="json"))
    assert params["train.local_steps"] == "5" and params["model.preset"] == "gpt2-micro"
    assert params["logging"] == "[]" and params["tracking.tracking_uri"] == "null"
    assert json.loads(params["federation.clients"])[0]["name"] == "aws"


def test_a_missing_library_is_one_clear_error(tmp_path, monkeypatch):
    cfg = load_config(None, "smoke", ["logging=[mlflow]"])
    monkeypatch.setitem(sys.modules, "mlflow", None)  # as if it were not installed
    with pytest.raises(ConfigError, match=r"logging: mlflow needs the 'mlflow' package \(pip install 'skyfed\[ops\]'\)"):
        make_trackers(cfg, tmp_path)
    assert make_trackers(load_config(None, "smoke", []), tmp_path) == []


def test_no_tracking_library_is_imported_unless_configured():
    code = "import sys, skyfed.report, skyfed.tracking; print([m for m in ('mlflow', 'tensorboard') if m in sys.modules])"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={"PYTHONPATH": str(ROOT / "src"), "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_unknown_logger_is_rejected_by_the_cli():
    done = run_cli("run", "--preset", "smoke", "--set", "logging=[wandb]", timeout=60)
    assert done.returncode == 2 and "logging.0: Input should be 'tensorboard' or 'mlflow'" in done.stderr


def test_run_reads_back_from_tensorboard_and_mlflow(tmp_path):
    from mlflow import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    out = tmp_path / "run"
    done = run_cli("run", "--preset", "smoke", "--quiet", "--set", "threads=1", "--set", "logging=[tensorboard,mlflow]",
                   "--set", "tracking.experiment=tracking-test", "--out", str(out), timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((out / "summary.json").read_text())
    assert [x["round"] for x in lines] == [0, 1]
    expected = {x["round"]: flatten_numbers(x) for x in lines}
    assert {"val_ppl", "bytes_up_by_client/aws", "train_loss/gcp", "sim_time_s", "egress_bytes/azure"} <= set(expected[1])

    # TensorBoard: every numeric field at its round (float32 in the event file)
    ea = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    ea.Reload()
    tags = set(ea.Tags()["scalars"])
    for r, fields in expected.items():
        for tag, value in fields.items():
            (event,) = [e for e in ea.Scalars(tag) if e.step == r]
            assert event.value == pytest.approx(value, rel=1e-6, abs=1e-12), tag
    assert {f"summary/{k}" for k in flatten_numbers(summary)} <= tags
    assert set().union(*expected.values()) | {f"summary/{k}" for k in flatten_numbers(summary)} == tags
    (final_ppl,) = ea.Scalars("summary/final/val_ppl")
    assert final_ppl.value == pytest.approx(summary["final"]["val_ppl"], rel=1e-6)
    hp = plugin_data_pb2.HParamsPluginData.FromString(ea.PluginTagToContent("hparams")["_hparams_/session_start_info"])
    assert hp.session_start_info.hparams["train.local_steps"].string_value == "5"
    assert hp.session_start_info.hparams["logging"].string_value == '["tensorboard", "mlflow"]'

    # MLflow: the default SQLite store in the run directory, full-precision values
    client = MlflowClient(tracking_uri=f"sqlite:///{out.resolve() / 'mlflow.db'}")
    exp = client.get_experiment_by_name("tracking-test")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == "run"
    assert json.loads((out / "mlflow_run.json").read_text())["run_id"] == run.info.run_id
    for r, fields in expected.items():
        for key, value in fields.items():
            (m,) = [m for m in client.get_metric_history(run.info.run_id, key) if m.step == r]
            assert m.value == value, key
    assert set(run.data.metrics) == set().union(*expected.values()) | {f"summary/{k}" for k in flatten_numbers(summary)}
    assert run.data.metrics["summary/final/val_ppl"] == summary["final"]["val_ppl"]
    assert run.data.params["model.preset"] == "gpt2-micro" and run.data.params["federation.rounds"] == "2"
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert artifacts == {"config.yaml", "summary.json"}
    local = client.download_artifacts(run.info.run_id, "summary.json", str(tmp_path))
    assert json.loads(open(local).read()) == summary
