"""Streaming aggregation: zero-copy views of plain updates, the running mean, and the
engine folding each update as it arrives (one update held at a time)."""

from __future__ import annotations

import json
import struct
import weakref
import zlib
from collections import deque

import pytest
import torch

from skyfed.compression.payload import decode_payload, encode_payload
from skyfed.compression.wire import FORMAT_VERSION, MAGIC, TensorSpec
from skyfed.config import load_config
from skyfed.errors import WireFormatError
from skyfed.federation.engine import Engine
from skyfed.federation.messages import ClientResult, TrainTask, Update
from skyfed.federation.strategies import build_strategy
from skyfed.federation.strategies.aggregate import weighted_mean
from skyfed.federation.strategies.mean import RunningMean
from skyfed.federation.transport import Transport
from skyfed.metrics import RunDir
from skyfed.train import EvalResult

SPEC = {"a": TensorSpec((3, 4), torch.float32), "b": TensorSpec((5,), torch.float32)}


def _deltas(k: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [{n: torch.randn(s.shape, generator=g) for n, s in SPEC.items()} for _ in range(k)]


def _raw_payload(st_header: dict, data: bytes) -> bytes:
    """A well-framed payload (right CRC) around a hand-made safetensors blob."""
    meta = json.dumps(st_header).encode()
    blob = struct.pack("<Q", len(meta)) + meta + data
    head = json.dumps({"codecs": [], "format": FORMAT_VERSION, "blob_bytes": len(blob), "crc32": zlib.crc32(blob)}).encode()
    return struct.pack("<6sHI", MAGIC, FORMAT_VERSION, len(head)) + head + blob


# ---------------------------------------------------------------- views


def test_plain_payload_views_equal_the_copying_decode_and_share_its_memory():
    delta = _deltas(1)[0]
    payload = bytearray(encode_payload(delta, kind="update"))
    views, _ = decode_payload(payload, SPEC, views=True)
    copied, _ = decode_payload(bytes(payload), SPEC)
    start = torch.frombuffer(payload, dtype=torch.uint8).data_ptr()
    for n in SPEC:
        assert torch.equal(views[n], copied[n]) and torch.equal(views[n], delta[n])
        assert start <= views[n].data_ptr() < start + len(payload)  # a view, not a copy
    ro, _ = decode_payload(bytes(payload), SPEC, views=True)  # read-only bytes work too
    assert torch.equal(ro["a"], delta["a"])


@pytest.mark.parametrize("entry, message", [
    ({"dtype": "F32", "shape": [3, 4], "data_offsets": [0, 4000]}, "does not fit"),
    ({"dtype": "F32", "shape": [3, 5], "data_offsets": [0, 48]}, "does not fit"),
    ({"dtype": "Q9", "shape": [3, 4], "data_offsets": [0, 48]}, "bad entry"),
    ({"shape": [3, 4], "data_offsets": [0, 48]}, "bad entry"),
])
def test_malformed_tensor_entries_with_a_valid_crc_are_wire_errors(entry, message):
    payload = _raw_payload({"a": entry, "b": {"dtype": "F32", "shape": [5], "data_offsets": [48, 68]}}, bytes(68))
    with pytest.raises(WireFormatError, match=message):
        decode_payload(payload, SPEC, views=True)


def test_views_are_validated_like_copies():
    bad_shape = {"a": torch.zeros(4, 3), "b": torch.zeros(5)}
    with pytest.raises(WireFormatError, match="has shape"):
        decode_payload(encode_payload(bad_shape), SPEC, views=True)
    nan = {"a": torch.zeros(3, 4), "b": torch.tensor([0.0, float("nan"), 0, 0, 0])}
    with pytest.raises(WireFormatError, match="NaN or Inf"):
        decode_payload(encode_payload(nan), SPEC, views=True)


# ---------------------------------------------------------------- running mean


def _updates(deltas, tokens):
    return [Update(f"c{i}", 0, 0, d, n, 1.0) for i, (d, n) in enumerate(zip(deltas, tokens))]


def test_running_mean_equals_the_weighted_mean_with_unequal_weights():
    deltas, tokens = _deltas(3), [10, 70, 20]
    running = RunningMean(SPEC)
    for u in reversed(_updates(deltas, tokens)):  # arrival order does not matter
        running.add(u, float(u.num_tokens))
    expected = weighted_mean(deltas, tokens)
    for n, v in running.mean().items():
        torch.testing.assert_close(v, expected[n], rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="positive sum"):
        RunningMean(SPEC).mean()


def test_fedavg_fold_equals_the_buffered_formula():
    G = {n: torch.ones(s.shape) for n, s in SPEC.items()}
    deltas, tokens = _deltas(3, seed=1), [5, 1, 14]
    s = build_strategy("fedavg")
    running = RunningMean(SPEC)
    for u in _updates(deltas, tokens):
        s.fold(running, u)
    out = s.finish(G, running, 0)
    mean = weighted_mean(deltas, tokens)
    for n in SPEC:
        torch.testing.assert_close(out.params[n], G[n] - mean[n], rtol=1e-6, atol=1e-6)
    assert out.metrics["weights"] == pytest.approx({"c0": 0.25, "c1": 0.05, "c2": 0.7})


def test_fedadam_fold_over_two_rounds_equals_adam_on_the_weighted_mean():
    G = {n: torch.zeros(s.shape) for n, s in SPEC.items()}
    s = build_strategy("fedadam", {"lr": 0.1})
    ref = [G[n].clone().requires_grad_(True) for n in SPEC]
    opt = torch.optim.Adam(ref, lr=0.1, betas=(0.9, 0.99), eps=1e-3)
    params = G
    for r, tokens in enumerate([[3, 9, 1], [2, 2, 12]]):
        deltas = _deltas(3, seed=10 + r)
        running = RunningMean(SPEC)
        for u in _updates(deltas, tokens)[::-1]:
            s.fold(running, u)
        out = s.finish(params, running, r)
        params = out.params
        mean = weighted_mean(deltas, tokens)
        for p, n in zip(ref, SPEC):
            p.grad = mean[n].clone()
        opt.step()
        for p, n in zip(ref, SPEC):
            torch.testing.assert_close(params[n], p.detach(), rtol=1e-5, atol=1e-6)
        norm = torch.sqrt(sum((g ** 2).sum() for g in mean.values())).item()
        assert out.metrics["pseudo_grad_norm"] == pytest.approx(norm, rel=1e-5)


# ---------------------------------------------------------------- the engine


class Buf(bytearray):
    """A receive buffer that can be watched by weak reference."""


class ScriptedTransport(Transport):
    """Clients that answer with fixed deltas; each payload is built only when received,
    and the transport keeps no reference to it, so `peak_alive` counts the payloads
    that the engine still holds when the next one arrives."""

    def __init__(self, deltas: dict[str, dict[str, torch.Tensor]], extra: list[tuple[str, int]] = ()):
        self.deltas = deltas
        self.extra = list(extra)  # (client, round offset): duplicates, past or future rounds
        self.queue: deque[tuple[str, int]] = deque()
        self.alive: list[weakref.ref] = []
        self.peak_alive = 0
        self.received = self.released = 0

    def client_names(self) -> list[str]:
        return list(self.deltas)

    def send(self, client: str, task: TrainTask) -> None:
        self.version = task.version
        self.queue.append((client, task.round))
        if len(self.queue) == 2:  # the extras arrive while the round is still open
            self.queue.extend((c, task.round + dr) for c, dr in self.extra)

    def release(self, result: ClientResult, rejection: str | None = None) -> None:
        assert result.payload is None  # the engine dropped its reference first
        self.released += 1

    def receive(self, timeout: float | None = None) -> ClientResult | None:
        if not self.queue:
            return None
        client, round = self.queue.popleft()
        self.received += 1
        v = self.version
        payload = Buf(encode_payload(self.deltas[client], kind="update", round=round, client=client, base_version=v))
        self.alive = [r for r in self.alive if r() is not None] + [weakref.ref(payload)]
        self.peak_alive = max(self.peak_alive, len(self.alive))
        i = list(self.deltas).index(client)
        return ClientResult(client, round, v, payload, num_tokens=10 * (i + 1) ** 2, train_loss=1.0 + i)


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Parameter(torch.ones(3, 4))
        self.b = torch.nn.Parameter(torch.zeros(5))


def _run(tmp_path, strategy: str, stream: bool, extra=(), nan_client: str | None = None):
    cfg = load_config(preset="smoke", overrides=["federation.min_clients=2"])
    deltas = dict(zip(["c0", "c1", "c2", "c3"], _deltas(4, seed=3)))
    if nan_client:
        deltas[nan_client] = {n: torch.full(s.shape, float("nan")) for n, s in SPEC.items()}
    transport = ScriptedTransport(deltas, extra)
    model = Tiny()
    evaluator = lambda m, b: EvalResult(1.0, 2.0, 0.5, 10)  # noqa: E731
    engine = Engine(cfg, transport, model, ["a", "b"], build_strategy(strategy), evaluator, RunDir(tmp_path))
    assert engine.stream_aggregate  # a weighted-mean strategy streams by default
    engine.stream_aggregate = stream
    records = [engine.run_round(r) for r in range(2)]
    return engine, transport, records


@pytest.mark.parametrize("strategy", ["fedavg", "fedadam"])
def test_streamed_rounds_equal_buffered_rounds_and_hold_one_update(tmp_path, strategy):
    extra = [("c1", 0), ("c0", 0), ("c2", -1), ("c0", 5)]  # duplicates of c1 and c0, a past and a future round
    s_engine, s_t, s_rec = _run(tmp_path / "s", strategy, True, extra, nan_client="c3")
    b_engine, b_t, b_rec = _run(tmp_path / "b", strategy, False, extra, nan_client="c3")
    for n in SPEC:
        torch.testing.assert_close(s_engine.params[n], b_engine.params[n], rtol=1e-6, atol=1e-6)
        assert not torch.equal(s_engine.params[n], dict(Tiny().named_parameters())[n].detach())
    for a, b in zip(s_rec, b_rec):
        for key in ["aggregated", "version", "train_loss", "bytes_up", "bytes_up_by_client", "missing"]:
            assert a[key] == b[key], key
        assert set(a["rejected"]) == set(b["rejected"]) == {"c3"} and "NaN" in a["rejected"]["c3"]
        assert a["weights"] == pytest.approx(b["weights"])
        assert a["weights"] == pytest.approx({"c0": 1 / 14, "c1": 4 / 14, "c2": 9 / 14})
    assert s_t.received == s_t.released == b_t.released == 2 * 8  # every arrival is released, ignored ones too
    assert s_t.peak_alive == 1  # each update is folded and dropped before the next arrives
    assert b_t.peak_alive == 4  # buffered: c0..c2 held when c3 arrives (so the probe would catch it)


def test_streamed_round_below_quorum_leaves_the_model_untouched(tmp_path):
    cfg = load_config(preset="smoke", overrides=["federation.min_clients=3"])
    deltas = dict(zip(["c0", "c1", "c2"], _deltas(3)))
    deltas["c2"] = {n: torch.full(s.shape, float("inf")) for n, s in SPEC.items()}
    evaluator = lambda m, b: EvalResult(1.0, 2.0, 0.5, 10)  # noqa: E731
    engine = Engine(cfg, ScriptedTransport(deltas), Tiny(), ["a", "b"], build_strategy("fedavg"), evaluator, RunDir(tmp_path))
    before = {n: t.clone() for n, t in engine.params.items()}
    record = engine.run_round(0)
    assert record["aggregated"] is False and record["version"] == 0 and "c2" in record["rejected"]
    assert record["train_loss"] == {"c0": 1.0, "c1": 2.0}
    for n in before:
        assert torch.equal(engine.params[n], before[n])
