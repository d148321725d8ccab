"""Property-based tests of the gRPC servicer's PushUpdate handling (hypothesis).

The real `FederationServicer` over a real `GrpcTransport`, called in process with a
context that carries the call's metadata and whose `abort` raises as grpc's does
(tests/servicer_fuzz.py), receives hostile calls: mutated metadata and chunk streams;
the engine's decode then runs on whatever it queued. Nothing may escape but an abort
with a status, a call whose identity is refused never has a message read, and a valid
call after any number of hostile ones is still accepted and decodes.
"""

import contextlib

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from skyfed.compression.wire import TensorSpec
from skyfed.runtime.grpc import skyfed_pb2 as pb
from skyfed.runtime.grpc.rawchunks import encode_data_chunk
from servicer_fuzz import ServicerRig, hostile_metadata, hostile_stream

SPEC = {"w": TensorSpec((6, 5), torch.float32), "b": TensorSpec((7,), torch.float32)}
FAST = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


def _tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(s.shape, generator=g) for n, s in SPEC.items()}


@contextlib.contextmanager
def _fresh_rig():
    """A rig per hypothesis example: the payload's round (and so its length) is the same
    on every replay, so hypothesis draws the same mutations."""
    rig = ServicerRig(SPEC)
    try:
        yield rig
    finally:
        rig.close()


@pytest.fixture(scope="module")
def rig():
    with _fresh_rig() as rig:
        yield rig


@FAST
@given(rnd=st.randoms(use_true_random=False))
def test_hostile_streams_end_in_a_status_and_valid_ones_still_pass(rnd):
    with _fresh_rig() as rig:
        kind, chunks, metadata = hostile_stream(rnd, rig, rig.update(_tensors()), meta=False)
        outcome = rig.push(chunks, metadata=metadata)  # a SkyfedError escaping (grpc: UNKNOWN) fails the test
        assert outcome.startswith("aborted:") or outcome in ("accepted", "rejected"), (kind, outcome)
        if outcome.startswith("aborted:"):  # one short line, whatever the client sent
            assert outcome != "aborted:INTERNAL" and len(rig.last_abort) < 600 and "\n" not in rig.last_abort, (kind, rig.last_abort[:200])
        before = rig.decoded
        payload = rig.update(_tensors(1))
        good = [pb.UpdateChunk(header=rig.header(len(payload))).SerializeToString(), encode_data_chunk(payload)]
        assert rig.push(good) == "accepted" and rig.decoded == before + 1


ESCAPES = {  # the first three found by bench/fuzz.py on main; each must end in a gRPC status
    "Infinity in meta_json": lambda rig, p: [pb.UpdateChunk(header=rig.header(len(p), meta_json='{"x":Infinity}')).SerializeToString()],
    "deep meta_json": lambda rig, p: [pb.UpdateChunk(header=rig.header(len(p), meta_json="[" * 100_000 + "]" * 100_000)).SerializeToString()],
    "5000-digit meta_json": lambda rig, p: [pb.UpdateChunk(header=rig.header(len(p), meta_json='{"x":' + "9" * 5000 + "}")).SerializeToString()],
    "garbage first chunk": lambda rig, p: [b"\xff" * 8, encode_data_chunk(p)],
}


@pytest.mark.parametrize("case", sorted(ESCAPES))
def test_known_escapes_end_in_a_status(rig, case):
    payload = rig.update(_tensors())
    outcome = rig.push(ESCAPES[case](rig, payload) + [encode_data_chunk(payload)] * (case != "garbage first chunk"))
    assert outcome == "aborted:INVALID_ARGUMENT"


class _Unread:
    """A request stream that records whether the servicer read from it."""

    def __init__(self, chunks: list[bytes]):
        self.read, self._it = False, iter(chunks)

    def __iter__(self):
        return self

    def __next__(self) -> bytes:
        self.read = True
        return next(self._it)


@FAST
@given(rnd=st.randoms(use_true_random=False))
def test_hostile_metadata_is_refused_before_any_message_is_read(rnd):
    with _fresh_rig() as rig:
        kind, metadata = hostile_metadata(rnd, rig)
        payload = rig.update(_tensors())
        stream = _Unread([pb.UpdateChunk(header=rig.header(len(payload))).SerializeToString(), encode_data_chunk(payload)])
        outcome = rig.push(stream, metadata=metadata)
    if outcome.startswith("aborted:"):  # one short line, even for a 100,000-character name or version
        assert len(rig.last_abort) < 600 and "\n" not in rig.last_abort, (kind, rig.last_abort[:200])
    if outcome in ("aborted:FAILED_PRECONDITION", "aborted:UNAUTHENTICATED"):
        assert not stream.read, (kind, outcome)
    else:  # harmless changes (a repeated key after the good one, an extra token, padding) or gcp's own identity
        assert outcome in ("accepted", "aborted:INVALID_ARGUMENT"), (kind, outcome, metadata[:4])


def test_the_rig_counts_a_refusal_as_an_abort_with_its_status(rig):
    payload = rig.update(_tensors())
    too_big = [pb.UpdateChunk(header=rig.header(2**40)).SerializeToString(), encode_data_chunk(payload)]
    assert rig.push(too_big) == "aborted:RESOURCE_EXHAUSTED"
    good = [pb.UpdateChunk(header=rig.header(len(payload))).SerializeToString(), encode_data_chunk(payload)]
    wrong_session = [(k, "x" if k == "skyfed-session" else v) for k, v in rig.metadata()]
    assert rig.push(good, metadata=wrong_session) == "aborted:UNAUTHENTICATED"
    old_version = [(k, "1" if k == "skyfed-protocol" else v) for k, v in rig.metadata()]
    assert rig.push(good, metadata=old_version) == "aborted:FAILED_PRECONDITION"
    flipped = bytearray(payload)
    flipped[-1] ^= 1
    crc = [pb.UpdateChunk(header=rig.header(len(payload))).SerializeToString(), encode_data_chunk(bytes(flipped))]
    assert rig.push(crc) == "aborted:INVALID_ARGUMENT"
