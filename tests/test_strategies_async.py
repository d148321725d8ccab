"""The asynchronous event loop, driven by a fake transport with a simulated clock.

The fake clients "train" by moving halfway to a per-client target, so every model
version can be computed by hand; each client takes a fixed simulated time per task,
so the arrival order (and thus every staleness) is known exactly.
"""

import heapq
import json

import pytest
import torch

from skyfed.compression.payload import decode_payload, encode_payload
from skyfed.compression.wire import TensorSpec
from skyfed.config import ClientSpec, ExperimentConfig
from skyfed.federation.engine import Engine
from skyfed.federation.messages import ClientResult
from skyfed.federation.strategies import build_strategy
from skyfed.federation.transport import Transport
from skyfed.metrics import RunDir
from skyfed.train import EvalResult

X0 = torch.tensor([0.0, 0.0])
TARGETS = {"a": torch.tensor([1.0, 2.0]), "c": torch.tensor([-3.0, 1.0]), "b": torch.tensor([0.5, -1.0])}
SPEC = {"w": TensorSpec((2,), torch.float32)}


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(X0.clone())


class SimTransport(Transport):
    """Results arrive in simulated completion order (ties: send order); or FIFO."""

    def __init__(self, durations, fifo=False, fail=()):
        self.durations = durations
        self.fifo = fifo
        self.fail = set(fail)  # task numbers that come back as an error
        self.clock = 0.0
        self.heap = []
        self.seq = 0
        self.sent = []  # (client, task round, version)

    def client_names(self):
        return list(self.durations)

    def send(self, client, task):
        params, _ = decode_payload(task.payload, SPEC)
        start = params["w"]
        end = start + 0.5 * (TARGETS[client] - start)
        self.sent.append((client, task.round, task.version))
        if task.round in self.fail:
            result = ClientResult(client, task.round, task.version, None, error="disk full")
        else:
            payload = encode_payload({"w": start - end}, kind="update", round=task.round, client=client,
                                     base_version=task.version)
            result = ClientResult(client, task.round, task.version, payload, num_tokens=10, train_loss=1.0,
                                  compute_s=self.durations[client])
        finish = self.clock + self.durations[client]
        heapq.heappush(self.heap, (self.seq if self.fifo else finish, self.seq, finish, result))
        self.seq += 1

    def receive(self, timeout=None):
        if not self.heap:
            return None
        _, _, finish, result = heapq.heappop(self.heap)
        self.clock = max(self.clock, finish)
        return result

    def now(self):
        return self.clock


def make_engine(tmp_path, strategy, transport, rounds=2):
    clients = [ClientSpec(name=n) for n in transport.client_names()]
    cfg = ExperimentConfig.model_validate({"federation": {"rounds": rounds, "clients": [c.model_dump() for c in clients]}})
    model = Tiny()

    def evaluator(m, max_batches):
        loss = float(m.w.detach().abs().sum())
        return EvalResult(loss, 1.0 + loss, 0.5, 2)

    return Engine(cfg, transport, model, ["w"], strategy, evaluator, RunDir(tmp_path))


def lines(tmp_path):
    return [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]


def expected_fedasync(alpha):
    """a takes 1 s, c takes 3 s, 2 rounds x 2 clients = 4 tasks (see test below)."""
    def new(cur, base, client):
        return (1 - alpha) * cur + alpha * (base + 0.5 * (TARGETS[client] - base))

    x1 = new(X0, X0, "a")  # t=1: a (base v0), staleness 0
    x2 = new(x1, x1, "a")  # t=2: a (base v1), staleness 0
    x3 = new(x2, X0, "c")  # t=3: c (base v0), staleness 2
    x4 = new(x3, x2, "a")  # t=3: a (base v2), staleness 1
    return x4


def test_fedasync_simulated_order_staleness_and_base_versions(tmp_path):
    transport = SimTransport({"a": 1.0, "c": 3.0})
    strategy = build_strategy("fedasync", {"alpha": 0.5, "staleness": "constant"})
    engine = make_engine(tmp_path, strategy, transport)
    engine.run()
    assert torch.allclose(engine.params["w"], expected_fedasync(0.5), atol=1e-6)
    assert engine.version == 4
    assert [s[0] for s in transport.sent] == ["a", "c", "a", "a"]  # budget: rounds x clients tasks
    rows = lines(tmp_path)
    assert [r["round"] for r in rows] == [0, 1]
    assert [r["staleness"]["values"] for r in rows] == [[0, 0], [2, 1]]
    assert [r["sim_time_s"] for r in rows] == [2.0, 3.0]
    assert [r["version"] for r in rows] == [2, 4]
    assert rows[1]["staleness"]["max"] == 2 and rows[1]["staleness"]["mean"] == 1.5
    for key in ("val_loss", "val_ppl", "val_token_acc", "bytes_up", "bytes_down", "cum_bytes_up", "train_loss",
                "rejected", "missing", "clients", "compute_s", "elapsed_s", "aggregate_s", "eval_s"):
        assert key in rows[0], key
    x1 = 0.5 * X0 + 0.5 * (X0 + 0.5 * (TARGETS["a"] - X0))
    x2 = 0.5 * x1 + 0.5 * (x1 + 0.5 * (TARGETS["a"] - x1))
    assert rows[0]["val_loss"] == pytest.approx(float(x2.abs().sum()))  # evaluated on version 2
    assert rows[1]["cum_bytes_down"] == rows[0]["bytes_down"] + rows[1]["bytes_down"]
    assert (tmp_path / "checkpoint" / "state.pt").exists()


def test_max_staleness_drops_and_logs(tmp_path):
    transport = SimTransport({"a": 1.0, "c": 3.0})
    strategy = build_strategy("fedasync", {"alpha": 1.0, "staleness": "constant", "max_staleness": 1})
    engine = make_engine(tmp_path, strategy, transport)
    engine.run()
    rows = lines(tmp_path)
    assert rows[1]["dropped"] == {"c": 2}
    assert engine.version == 3  # c's update never touched the model
    x2 = X0 + 0.75 * (TARGETS["a"] - X0)
    assert torch.allclose(engine.params["w"], x2 + 0.5 * (TARGETS["a"] - x2), atol=1e-6)


def test_fifo_order_is_also_correct(tmp_path):
    """Today's in-process transport returns results in send order; staleness follows."""
    transport = SimTransport({"a": 1.0, "c": 3.0}, fifo=True)
    engine = make_engine(tmp_path, build_strategy("fedasync", {"alpha": 1.0, "staleness": "constant"}), transport)
    engine.run()
    # sends: a(v0) c(v0); a arrives -> v1, a(v1); c arrives (stale 1) -> v2, c(v2); a arrives (stale 1) -> v3; c (0) -> v4
    assert [r["staleness"]["values"] for r in lines(tmp_path)] == [[0, 1], [1, 1]]
    assert engine.version == 4


def test_fedbuff_in_the_loop(tmp_path):
    """Equal durations: clients re-sent before the buffer fills train on the older model."""
    transport = SimTransport({"a": 1.0, "b": 1.0, "c": 1.0})
    engine = make_engine(tmp_path, build_strategy("fedbuff", {"buffer_size": 3}), transport, rounds=3)
    engine.run()
    x = X0
    for _ in range(3):
        x = sum(x + 0.5 * (TARGETS[c] - x) for c in "abc") / 3
    # after the first buffer, the two clients that were re-sent before the publish are stale by 1
    rows = lines(tmp_path)
    assert rows[0]["staleness"]["values"] == [0, 0, 0]
    assert engine.version == 3
    assert not torch.allclose(engine.params["w"], x)  # staleness matters: a and b trained on an older model
    # with buffer_size 1 and one client it is plain sequential FedAvg
    t2 = SimTransport({"a": 1.0})
    e2 = make_engine(tmp_path / "one", build_strategy("fedbuff", {"buffer_size": 1}), t2, rounds=3)
    e2.run()
    y = X0
    for _ in range(3):
        y = y + 0.5 * (TARGETS["a"] - y)
    assert torch.allclose(e2.params["w"], y, atol=1e-6)


def test_rejected_update_never_touches_the_model(tmp_path):
    transport = SimTransport({"a": 1.0, "c": 3.0}, fail={1})  # c's first task fails
    engine = make_engine(tmp_path, build_strategy("fedasync", {"alpha": 1.0, "staleness": "constant"}), transport)
    engine.run()
    rows = lines(tmp_path)
    assert rows[1]["rejected"] == {"c": "disk full"}
    assert engine.version == 3 and sum(r["updates"] for r in rows[-1:]) == 4


def test_deterministic_and_resumable(tmp_path):
    def run(path, rounds, resume=False):
        t = SimTransport({"a": 1.0, "b": 2.0, "c": 3.0})
        e = make_engine(path, build_strategy("fedbuff", {"buffer_size": 2}), t, rounds=rounds)
        if resume:
            e.resume()
        e.run()
        return e

    drop = ("wall_time_s", "elapsed_s", "aggregate_s", "eval_s", "compute_s")
    e1 = run(tmp_path / "x", 3)
    e2 = run(tmp_path / "y", 3)
    strip = lambda rows: [{k: v for k, v in r.items() if k not in drop} for r in rows]  # noqa: E731
    assert strip(lines(tmp_path / "x")) == strip(lines(tmp_path / "y"))
    assert torch.equal(e1.params["w"], e2.params["w"])
    # stop after 2 lines, then resume to 3: the buffer and version come back from the checkpoint
    e3 = run(tmp_path / "z", 2)
    assert e3.core.strategy.buffer == []  # flushed at the end of the budget
    e4 = run(tmp_path / "z", 3, resume=True)
    assert [r["round"] for r in lines(tmp_path / "z")] == [0, 1, 2]
    assert e4.version > e3.version
    assert lines(tmp_path / "z")[2]["updates"] == 9
