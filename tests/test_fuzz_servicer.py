"""Property-based tests of the gRPC servicer's PushUpdate handling (hypothesis).

The real `FederationServicer` over a real `GrpcTransport`, called in process with a
context whose `abort` raises as grpc's does (tests/servicer_fuzz.py), receives
hostile chunk streams; the engine's decode then runs on whatever it queued. Nothing
may escape but an abort with a status or a skyfed error, and a valid stream after any
number of hostile ones is still accepted and decodes.
"""

import random

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from skyfed.compression.payload import encode_payload
from skyfed.compression.wire import TensorSpec
from skyfed.errors import SkyfedError
from skyfed.runtime.grpc import skyfed_pb2 as pb
from skyfed.runtime.grpc.rawchunks import encode_data_chunk
from servicer_fuzz import ServicerRig, hostile_stream

SPEC = {"w": TensorSpec((6, 5), torch.float32), "b": TensorSpec((7,), torch.float32)}
FAST = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


def _payload(seed: int = 0) -> bytes:
    g = torch.Generator().manual_seed(seed)
    return encode_payload({n: torch.randn(s.shape, generator=g) for n, s in SPEC.items()}, kind="update", round=0, client="aws")


@pytest.fixture(scope="module")
def rig():
    return ServicerRig(SPEC)


def _push_expecting_only_refusals(rig: ServicerRig, chunks: list[bytes]) -> str:
    try:
        return rig.push(chunks)
    except SkyfedError as exc:  # a project error (grpc would answer UNKNOWN): allowed by the bar, not by issue 12
        return f"escaped:{type(exc).__name__}"


@FAST
@given(rnd=st.randoms(use_true_random=False))
def test_hostile_streams_end_in_a_status_and_valid_ones_still_pass(rig, rnd):
    kind, chunks = hostile_stream(rnd, rig, _payload(), meta=False)
    _push_expecting_only_refusals(rig, chunks)
    before = rig.decoded
    payload = _payload(1)
    good = [pb.UpdateChunk(header=rig.header(len(payload))).SerializeToString(), encode_data_chunk(payload)]
    assert rig.push(good) == "accepted" and rig.decoded == before + 1


ESCAPES = {  # found by bench/fuzz.py on main; each must end in a gRPC status
    "deep meta_json": lambda rig, p: [pb.UpdateChunk(header=rig.header(len(p), meta_json="[" * 100_000 + "]" * 100_000)).SerializeToString()],
    "5000-digit meta_json": lambda rig, p: [pb.UpdateChunk(header=rig.header(len(p), meta_json='{"x":' + "9" * 5000 + "}")).SerializeToString()],
    "garbage first chunk": lambda rig, p: [b"\xff" * 8, encode_data_chunk(p)],
}


@pytest.mark.xfail(strict=True, reason="servicer.py: _meta's json.loads raises RecursionError/ValueError, and a "
                   "malformed first chunk raises WireFormatError without a status; hardened on the grpcsec branch "
                   "(remove this mark once it is merged)")
@pytest.mark.parametrize("case", sorted(ESCAPES))
def test_known_escapes_end_in_a_status(rig, case):
    payload = _payload()
    outcome = rig.push(ESCAPES[case](rig, payload) + [encode_data_chunk(payload)] * (case != "garbage first chunk"))
    assert outcome.startswith("aborted:") or outcome == "accepted"


def test_the_rig_counts_a_refusal_as_an_abort_with_its_status(rig):
    payload = _payload()
    too_big = [pb.UpdateChunk(header=rig.header(2**40)).SerializeToString(), encode_data_chunk(payload)]
    assert rig.push(too_big) == "aborted:RESOURCE_EXHAUSTED"
    wrong_session = [pb.UpdateChunk(header=rig.header(len(payload), session_id="x")).SerializeToString()]
    assert rig.push(wrong_session) == "aborted:UNAUTHENTICATED"
    flipped = bytearray(payload)
    flipped[-1] ^= 1
    crc = [pb.UpdateChunk(header=rig.header(len(payload))).SerializeToString(), encode_data_chunk(bytes(flipped))]
    assert rig.push(crc) == "aborted:INVALID_ARGUMENT"
