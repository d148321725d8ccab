"""Secure aggregation riding skyfed's Transport seam: control stages as ordinary tasks
and results over the simulated transport, the masked vector as the update payload."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from skyfed.compression.wire import spec_of
from skyfed.errors import SecAggError
from skyfed.federation.messages import ClientResult, TrainTask
from skyfed.runtime.inprocess import SimulatedTransport
from skyfed.security.secagg import SecAggSettings, UpdateEncoder
from skyfed.security.secagg.coordinator import SecAggCoordinator
from skyfed.security.secagg.participant import SecAggParticipant

SHAPES = {"w": (6, 5), "b": (4,)}
SPEC = spec_of({k: torch.zeros(s) for k, s in SHAPES.items()})
SETTINGS = SecAggSettings(ring_bits=16, bound=0.1)
MAX_TOKENS = 1000


def delta_of(name: str) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(int(name[1:]))
    return {k: torch.randn(s, generator=g) * 0.03 for k, s in SHAPES.items()}


def tokens_of(name: str) -> int:
    return 200 * (int(name[1:]) + 1)


class FakeClient:
    """A client that 'trains' to a fixed delta; `dies_at` makes it fail at one stage."""

    def __init__(self, name: str, dies_at: str | None = None):
        self.name = name
        self.dies_at = dies_at
        self.secagg = SecAggParticipant(name, SPEC, SETTINGS)

    def handle(self, task: TrainTask) -> ClientResult:
        stage = task.options.get("secagg", {}).get("stage")
        if stage == self.dies_at:
            return ClientResult(self.name, task.round, task.version, None, error="killed")
        if self.secagg.is_control(task):
            return self.secagg.control(task)
        payload = self.secagg.masked_payload(task, delta_of(self.name), tokens_of(self.name))
        return ClientResult(self.name, task.round, task.version, payload, num_tokens=tokens_of(self.name), train_loss=2.0)


def secure_round(clients: list[FakeClient], round: int = 2):
    transport = SimulatedTransport(clients)  # duck-typed clients; no network: zero time, send order
    coord = SecAggCoordinator(SPEC, SETTINGS, MAX_TOKENS)
    names = [c.name for c in clients]
    options = coord.setup(transport, names, round, version=5)
    for name, extra in options.items():
        transport.send(name, TrainTask(round, 5, b"model", 3, {"prox_mu": 0.0, **extra}))
    for _ in options:
        result = transport.receive(None)
        coord.accept(result)
        transport.release(result)
    return coord.finish(transport, round, version=5), options


def expected_mean(names: list[str], n: int) -> dict[str, torch.Tensor]:
    enc = UpdateEncoder(SPEC, SETTINGS, n)
    q = sum(enc.quantize(delta_of(c), tokens_of(c) / MAX_TOKENS) for c in names)
    return enc.layout.unflatten(q / enc.fixed.scale / sum(tokens_of(c) / MAX_TOKENS for c in names))


def test_a_secure_round_over_the_transport_gives_the_exact_weighted_mean():
    clients = [FakeClient(f"c{i}") for i in range(4)]
    outcome, _ = secure_round(clients)
    assert outcome.survivors == ["c0", "c1", "c2", "c3"] and outcome.dropped == []
    expected = expected_mean(outcome.survivors, 4)
    assert all(torch.equal(outcome.update.delta[k], expected[k]) for k in SHAPES)
    assert outcome.update.num_tokens == 200 + 400 + 600 + 800
    plain = {k: sum(delta_of(c)[k] * tokens_of(c) for c in outcome.survivors) / 2000 for k in SHAPES}
    step = UpdateEncoder(SPEC, SETTINGS, 4).fixed.step
    assert all((outcome.update.delta[k] - plain[k]).abs().max() <= step for k in SHAPES)


def test_a_client_dying_during_training_is_unmasked_away():
    clients = [FakeClient(f"c{i}", dies_at="mask" if i == 1 else None) for i in range(5)]
    outcome, options = secure_round(clients)
    assert len(options) == 5  # it finished set-up, then died
    assert outcome.dropped == ["c1"] and outcome.survivors == ["c0", "c2", "c3", "c4"]
    expected = expected_mean(outcome.survivors, 5)
    assert all(torch.equal(outcome.update.delta[k], expected[k]) for k in SHAPES)


def test_a_client_dying_at_set_up_is_left_out():
    clients = [FakeClient(f"c{i}", dies_at="shares" if i == 0 else None) for i in range(4)]
    outcome, options = secure_round(clients)
    assert sorted(options) == ["c1", "c2", "c3"] and outcome.dropped == []
    expected = expected_mean(outcome.survivors, 4)
    assert all(torch.equal(outcome.update.delta[k], expected[k]) for k in SHAPES)


def test_too_many_dying_after_set_up_refuses_the_round():
    clients = [FakeClient(f"c{i}", dies_at="mask" if i < 2 else None) for i in range(3)]
    with pytest.raises(SecAggError, match="the round is refused"):
        secure_round(clients)
