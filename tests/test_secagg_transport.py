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


def make_client(name: str, seed: int, secure: bool):
    from skyfed.config import TrainConfig
    from skyfed.federation.client import FederatedClient
    from skyfed.model import build_model, federated_parameter_names
    from skyfed.train import LocalTrainer

    cfg = TrainConfig(local_steps=2, batch_size=2, seq_len=16, lr=1e-2, warmup_steps=0, schedule="constant",
                      weight_decay=0.0, optimizer_state="reset")
    model = build_model("gpt2-micro", 64, 0, seed=1)
    tokens = np.random.default_rng(seed).integers(0, 64, size=600 * (seed + 1)).astype(np.uint16)
    client = FederatedClient(name, tokens, LocalTrainer(model, cfg, torch.device("cpu"), total_steps=2),
                             federated_parameter_names(model), seed=seed)
    if secure:
        client.secagg = SecAggParticipant(name, client.spec, SecAggSettings(ring_bits=32, bound=0.5))
    return client


def test_real_clients_send_masked_updates_whose_secure_mean_is_fedavg():
    from skyfed.compression.payload import decode_payload, encode_payload
    from skyfed.model import get_params

    names = ["aws", "gcp", "azure"]
    plain_clients = [make_client(n, i, secure=False) for i, n in enumerate(names)]
    start = get_params(plain_clients[0].trainer.model, plain_clients[0].param_names)
    model = encode_payload(start, kind="model")
    plain = {}
    for c in plain_clients:
        r = c.handle(TrainTask(0, 0, model, 2, {}))
        plain[c.name] = (decode_payload(r.payload, c.spec)[0], r.num_tokens)
    total = sum(n for _, n in plain.values())
    fedavg = {k: sum(d[k] * n for d, n in plain.values()) / total for k in start}

    secure_clients = [make_client(n, i, secure=True) for i, n in enumerate(names)]
    spec = secure_clients[0].spec
    transport = SimulatedTransport(secure_clients)
    coord = SecAggCoordinator(spec, SecAggSettings(ring_bits=32, bound=0.5), max_tokens=2 * 2 * 16)
    options = coord.setup(transport, names, 0, 0)
    for name, extra in options.items():
        transport.send(name, TrainTask(0, 0, model, 2, extra))
    masked_sizes = []
    for _ in names:
        result = transport.receive(None)
        masked_sizes.append(len(result.payload))
        assert coord.accept(result)
    outcome = coord.finish(transport, 0, 0)
    dim = sum(int(np.prod(s.shape)) for s in spec.values())
    assert all(4 * dim < size < 4 * dim + 400 for size in masked_sizes)  # 32-bit ring + framing
    assert outcome.update.num_tokens == total
    for k in start:
        assert torch.allclose(outcome.update.delta[k], fedavg[k], atol=1e-6), k


