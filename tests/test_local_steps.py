"""Local steps per client (skyfed.federation.steps): by cloud speed or set per client, in
the synchronous and asynchronous loops, with the asynchronous budget counted in steps."""

import json

import pytest
import torch

from skyfed.config import ExperimentConfig
from skyfed.errors import ConfigError
from skyfed.federation.engine import Engine
from skyfed.federation.steps import client_schedules, client_steps, schedule_steps, step_budget
from skyfed.federation.strategies import build_strategy
from skyfed.metrics import RunDir
from skyfed.security.secagg.compat import check_local_steps
from skyfed.train import EvalResult
from test_strategies_async import SimTransport, Tiny

SLOW_AZURE = {
    "train": {"local_steps": 40},
    "clouds": {"profiles": {"azure": {"speed": 0.25}}, "reference_tokens_per_s": 200000},
    "federation": {"rounds": 10, "steps_by_speed": True},
}


def config(**sections) -> ExperimentConfig:
    return ExperimentConfig.model_validate(sections)


def test_steps_by_speed_follow_the_profiles():
    cfg = config(**SLOW_AZURE)
    assert client_steps(cfg, 10**6) == {"aws": 40, "gcp": 40, "azure": 10}
    # the built-in azure profile (speed 0.8): 32 steps; off: everyone train.local_steps
    assert client_steps(config(federation={"steps_by_speed": True}), 10**6) == {"aws": 40, "gcp": 40, "azure": 32}
    assert client_steps(config(), 10**6) == {"aws": 40, "gcp": 40, "azure": 40}
    # a measured throughput (tokens_per_s) is compared with the FLOPs-based ones of the same model size
    measured = config(federation={"steps_by_speed": True}, clouds={"profiles": {"gcp": {"tokens_per_s": 1e14 / 6e6 / 2}}})
    assert client_steps(measured, 10**6) == {"aws": 40, "gcp": 20, "azure": 32}
    # never below one step
    tiny = config(federation={"steps_by_speed": True}, clouds={"profiles": {"azure": {"speed": 0.001}}})
    assert client_steps(tiny, 10**6)["azure"] == 1


def test_a_clients_own_local_steps_win():
    clients = [{"name": "aws", "local_steps": 7}, {"name": "gcp"}, {"name": "azure"}]
    cfg = config(**{**SLOW_AZURE, "federation": {**SLOW_AZURE["federation"], "clients": clients}})
    assert client_steps(cfg, 1) == {"aws": 7, "gcp": 40, "azure": 10}
    with pytest.raises(ValueError, match="local_steps"):
        config(federation={"clients": [{"name": "aws", "local_steps": 0}]})


def test_schedules_span_each_clients_expected_steps():
    cfg = config(**SLOW_AZURE)
    steps = client_steps(cfg, 1)
    assert step_budget(cfg) == 1200
    assert schedule_steps(cfg, steps, asynchronous=False) == {"aws": 400, "gcp": 400, "azure": 100}
    # asynchronous: equal task times, so each client's share of the 1200 steps is 40/90 or 10/90
    assert schedule_steps(cfg, steps, asynchronous=True) == {"aws": 534, "gcp": 534, "azure": 134}
    fedasync = config(**{**SLOW_AZURE, "federation": {**SLOW_AZURE["federation"], "strategy": {"name": "fedasync"}}})
    assert client_schedules(fedasync, 1) == {"aws": 534, "gcp": 534, "azure": 134}
    assert client_schedules(cfg, 1) == {"aws": 400, "gcp": 400, "azure": 100}


class StepsTransport(SimTransport):
    def __init__(self, durations):
        super().__init__(durations)
        self.steps = []  # (client, task number, steps)

    def send(self, client, task):
        self.steps.append((client, task.round, task.steps))
        super().send(client, task)


def engine_for(tmp_path, strategy, transport, rounds, local_steps, clients):
    cfg = ExperimentConfig.model_validate(
        {"train": {"local_steps": local_steps}, "federation": {"rounds": rounds, "clients": clients}}
    )

    def evaluator(m, max_batches):
        loss = float(m.w.detach().abs().sum())
        return EvalResult(loss, 1.0 + loss, 0.5, 2)

    return Engine(cfg, transport, Tiny(), ["w"], strategy, evaluator, RunDir(tmp_path))


def lines(path):
    return [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]


def test_async_budget_is_counted_in_steps(tmp_path):
    """a takes 4 steps a task, c 1; both 1 s a task. Budget 2 rounds x 2 clients x 4 = 16 steps."""
    transport = StepsTransport({"a": 1.0, "c": 1.0})
    clients = [{"name": "a"}, {"name": "c", "local_steps": 1}]
    engine = engine_for(tmp_path, build_strategy("fedasync", {"alpha": 0.5, "staleness": "constant"}), transport,
                        rounds=2, local_steps=4, clients=clients)
    engine.run()
    # a's third task is cut to the one step left
    assert [(c, s) for c, _, s in transport.steps] == [("a", 4), ("c", 1), ("a", 4), ("c", 1), ("a", 4), ("c", 1), ("a", 1)]
    assert sum(s for *_, s in transport.steps) == 16
    rows = lines(tmp_path)
    # a window closes when the received steps pass 8 (one synchronous round's worth): after 9, then at 16
    assert [r["round"] for r in rows] == [0, 1]
    assert [r["updates"] for r in rows] == [3, 7]
    assert engine.version == 7
    assert engine.loop.received_steps == 16 and engine.loop.sent_steps == 16


def test_async_with_equal_steps_is_unchanged(tmp_path):
    """Without per-client steps the budget is rounds x clients tasks, as before."""
    transport = StepsTransport({"a": 1.0, "c": 3.0})
    engine = engine_for(tmp_path, build_strategy("fedasync", {"alpha": 0.5, "staleness": "constant"}), transport,
                        rounds=2, local_steps=5, clients=[{"name": "a"}, {"name": "c"}])
    engine.run()
    assert [(c, s) for c, _, s in transport.steps] == [("a", 5), ("c", 5), ("a", 5), ("a", 5)]
    assert [r["round"] for r in lines(tmp_path)] == [0, 1]


def test_async_resume_keeps_the_step_counts(tmp_path):
    clients = [{"name": "a"}, {"name": "c", "local_steps": 1}]

    def engine(rounds):
        t = StepsTransport({"a": 1.0, "c": 2.0})
        return engine_for(tmp_path, build_strategy("fedbuff", {"buffer_size": 2}), t, rounds=rounds, local_steps=4,
                          clients=clients)

    engine(2).run()
    resumed = engine(3)
    assert resumed.resume() == 1
    assert (resumed.loop.received_steps, resumed.loop.sent_steps) == (16, 16)
    resumed.run()
    assert resumed.loop.received_steps == 24
    assert [r["round"] for r in lines(tmp_path)] == [0, 1, 2]
    # a checkpoint written before per-client steps counted whole tasks of train.local_steps
    old = {"received": 3, "sent": 5, "in_flight": {"a": (3, 2), "c": (4, 2)}, "bases": {}, "idle": []}
    resumed.loop.load_state_dict(old)
    assert (resumed.loop.received_steps, resumed.loop.sent_steps) == (12, 20)
    assert resumed.loop.in_flight["c"].steps == 4


def test_sync_round_sends_each_client_its_steps(tmp_path):
    transport = StepsTransport({"a": 1.0, "c": 1.0})
    clients = [{"name": "a"}, {"name": "c", "local_steps": 2}]
    engine = engine_for(tmp_path, build_strategy("fedavg", {}), transport, rounds=2, local_steps=6, clients=clients)
    engine.run()
    assert [(c, s) for c, _, s in transport.steps] == [("a", 6), ("c", 2), ("a", 6), ("c", 2)]


def test_secure_aggregation_refuses_uneven_steps_it_cannot_bound():
    over = config(train={"local_steps": 4}, federation={"clients": [{"name": "aws", "local_steps": 5}, {"name": "gcp"}]})
    with pytest.raises(ConfigError, match=r"take more local_steps than train.local_steps \(4\)"):
        check_local_steps(over)
    buffered = config(federation={"steps_by_speed": True, "strategy": {"name": "fedbuff"}})
    with pytest.raises(ConfigError, match="fedbuff needs equal local steps"):
        check_local_steps(buffered)
    check_local_steps(config(federation={"steps_by_speed": True}))  # synchronous, steps <= train.local_steps: fine
