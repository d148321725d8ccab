"""A simulation killed with SIGKILL and resumed ends bit-identical to an uninterrupted run:
every part of the state (server core, loop, clients' optimizer moments, error-feedback
residuals and downlink models, the simulated clock and bill) is in the checkpoint."""

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from conftest import ROOT, run_cli
import cli_forkserver

pytestmark = pytest.mark.processes

TIMING = {"wall_time_s", "elapsed_s", "aggregate_s", "eval_s", "compute_s"}
SETTINGS = [
    "threads=1", "federation.rounds=4", "clouds.aggregation_s=0.01",
    "compression.uplink=[{name: topk, fraction: 0.1}, int8]", "compression.downlink=[int8]",
]


def _lines(run: Path) -> list[dict]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


def _killed_and_resumed(out: Path, settings: list[str]) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    args = ["run", "--preset", "smoke", "-q", "--out", str(out)]
    for s in settings:
        args += ["--set", s]
    proc = cli_forkserver.start(args, env, Path.cwd(), os.devnull)
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 2:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "summary.json").exists()
    resume = ["run", "--preset", "smoke", "-q", "--out", str(out), "--resume"]
    for s in settings:
        resume += ["--set", s]
    return run_cli(*resume, timeout=600)


@pytest.mark.parametrize("strategy", ["fedadam", "fedbuff"])
def test_sigkill_then_resume_equals_an_uninterrupted_run(tmp_path, strategy):
    from concurrent.futures import ThreadPoolExecutor

    settings = SETTINGS + [f"federation.strategy.name={strategy}"]
    with ThreadPoolExecutor(1) as pool:  # the uninterrupted run beside the killed one: two processes at once
        uninterrupted = pool.submit(run_cli, "run", "--preset", "smoke", "-q", "--out", str(tmp_path / "whole"),
                                    *[a for s in settings for a in ("--set", s)], timeout=600)
        resumed = _killed_and_resumed(tmp_path / "resumed", settings)
        whole = uninterrupted.result()
    assert whole.returncode == 0, whole.stderr
    assert resumed.returncode == 0, resumed.stderr
    assert _lines(tmp_path / "resumed") == _lines(tmp_path / "whole")
    a = load_file(tmp_path / "whole" / "model" / "model.safetensors")
    b = load_file(tmp_path / "resumed" / "model" / "model.safetensors")
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    sa = json.loads((tmp_path / "whole" / "summary.json").read_text())
    sb = json.loads((tmp_path / "resumed" / "summary.json").read_text())
    assert sa["final"] == sb["final"] and sa["total"] == sb["total"] and sa["sim_time_s"] == sb["sim_time_s"]


def test_resume_with_another_config_is_refused(tmp_path):
    first = run_cli("run", "--preset", "smoke", "-q", "--out", str(tmp_path / "r"), "--set", "federation.rounds=1")
    assert first.returncode == 0, first.stderr
    again = run_cli("run", "--preset", "smoke", "-q", "--out", str(tmp_path / "r"), "--resume", "--set", "federation.rounds=2",
                    "--set", "train.lr=0.01")
    assert again.returncode == 2
    assert "config differs" in again.stderr and "Traceback" not in again.stderr
