"""Client worker processes (`workers` > 1): same results as the sequential simulation,
clear errors instead of hangs, and no process left behind."""

import json
import multiprocessing
import os
import signal

import numpy as np
import pytest
import torch

from skyfed.federation.checkpoint import load_checkpoint
from skyfed.config import ExperimentConfig, load_config
from skyfed.errors import ConfigError, SkyfedError
from skyfed.federation.messages import TrainTask
from skyfed.runtime.inprocess import ParallelTransport
from skyfed.runtime.simulation import run_simulation
from skyfed.runtime.workers import ClientInit, WorkerPool

SMOKE = ["model.preset=gpt2-micro", "threads=1", "clouds.aggregation_s=0.0"]  # a deterministic clock
ROUND_KEYS = ["bytes_up", "bytes_down", "bytes_up_by_client", "train_loss", "val_loss", "sim_time_s", "egress_bytes"]


@pytest.fixture
def deadline():
    """Fail instead of hanging: SIGALRM after 120 s."""
    def expire(signum, frame):
        raise TimeoutError("test took over 120 s (a worker hang?)")

    old = signal.signal(signal.SIGALRM, expire)
    signal.alarm(120)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


def _run(tmp_path, label: str, extra: list[str]):
    run, summary = run_simulation(load_config(None, "smoke", SMOKE + extra), tmp_path / label)
    params, _ = load_checkpoint(run.path / "checkpoint")
    rounds = [json.loads(line) for line in (run.path / "metrics.jsonl").read_text().splitlines()]
    return params, rounds, summary


@pytest.mark.parametrize("extra", [
    [],
    ["compression.uplink=[int8]", "compression.downlink=[int8]"],  # residuals and downlink state in the workers
    ["federation.strategy.name=fedasync"],
], ids=["fedavg", "int8", "fedasync"])
def test_workers_match_sequential(tmp_path, deadline, extra):
    seq_params, seq_rounds, seq_summary = _run(tmp_path, "seq", ["workers=1", *extra])
    par_params, par_rounds, par_summary = _run(tmp_path, "par", ["workers=2", *extra])
    assert multiprocessing.active_children() == []
    assert set(seq_params) == set(par_params)
    for name in seq_params:
        assert torch.equal(seq_params[name], par_params[name]), name
    assert len(seq_rounds) == len(par_rounds)
    for seq, par in zip(seq_rounds, par_rounds):
        assert {k: seq.get(k) for k in ROUND_KEYS} == {k: par.get(k) for k in ROUND_KEYS}
    assert seq_summary["final"] == par_summary["final"]
    assert par_summary["workers"] == 2


def test_workers_config():
    assert ExperimentConfig().workers == 1
    with pytest.raises(ConfigError, match="workers"):
        load_config(None, "smoke", ["workers=0"])


# ---------------------------------------------------------------- failures (no data, no model)


class _Failing:
    def __init__(self, name: str, how: str):
        self.name, self.how, self.on_step = name, how, None

    def handle(self, task):
        if self.how == "exit":
            os._exit(3)
        raise RuntimeError("boom")


def build_raising(cfg, name, index, tokens, tokenizer, device):
    return _Failing(name, "raise")


def build_exiting(cfg, name, index, tokens, tokenizer, device):
    return _Failing(name, "exit")


def build_broken(cfg, name, index, tokens, tokenizer, device):
    raise ValueError("no such model")


def _transport(build) -> ParallelTransport:
    inits = [ClientInit(n, i, np.zeros(4, dtype=np.int32)) for i, n in enumerate(["a", "b"])]
    return ParallelTransport(WorkerPool(ExperimentConfig(threads=1), inits, None, 2, build=build), ["a", "b"])


@pytest.mark.parametrize("build, message", [
    (build_raising, r"client worker 1: client b failed: RuntimeError: boom"),
    (build_exiting, r"client worker 1 \(b\) died with exit code 3"),
])
def test_failing_worker_raises(deadline, build, message):
    transport = _transport(build)
    try:
        transport.send("b", TrainTask(0, 0, b"", 1))
        with pytest.raises(SkyfedError, match=message):
            transport.receive()
    finally:
        transport.close()
    assert multiprocessing.active_children() == []


def test_worker_build_error(deadline):
    with pytest.raises(SkyfedError, match="building clients failed: ValueError: no such model"):
        _transport(build_broken)
    assert multiprocessing.active_children() == []
