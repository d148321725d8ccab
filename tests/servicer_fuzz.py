"""Drive `FederationServicer.PushUpdate` in process with hostile chunk streams.

`ServicerRig` builds a real servicer over a real `GrpcTransport` (one client, ``aws``,
registered through `Register`) and a `FakeContext` whose `abort` raises `Aborted`, as
grpc's own context does. `push(chunks)` opens a fresh round for the client, feeds the
raw chunk bytes as the request stream (the server's PushUpdate deserializer is the
identity, so these are exactly the bytes a peer could send) and then plays the engine:
every result the servicer queued is decoded with `decode_payload(views=True)` as the
engine does, and released. It returns the outcome kind; anything the servicer or the
decoder raises that is neither a skyfed error nor an abort is re-raised to the caller.

`hostile_stream(rng, payload)` builds a mutated stream: header fields with wrong values
(sizes, versions, names, sessions, rounds, deep or non-finite meta_json, NaN losses),
bad framing (no header, two headers, garbage messages, short or long data) and
payloads mutated by `wire_mutations`.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import grpc

from skyfed.compression.payload import decode_payload
from skyfed.compression.wire import TensorSpec
from skyfed.errors import SkyfedError
from skyfed.federation.messages import TrainTask
from skyfed.runtime.grpc import PROTOCOL_VERSION
from skyfed.runtime.grpc import skyfed_pb2 as pb
from skyfed.runtime.grpc.rawchunks import encode_data_chunk
from skyfed.runtime.grpc.servicer import FederationServicer
from skyfed.runtime.grpc.transport import GrpcTransport
from wire_mutations import HOSTILE_TOKENS, mutate

TOKEN = "aws-secret-token"
MAX_UPDATE_BYTES = 1 << 20
CHUNK = 4096


class Aborted(Exception):
    """What `FakeContext.abort` raises (grpc raises a plain Exception there too)."""

    def __init__(self, code: grpc.StatusCode, details: str):
        super().__init__(f"{code.name}: {details}")
        self.code, self.details = code, details


class FakeContext:
    """The parts of `grpc.ServicerContext` a servicer uses, for in-process calls."""

    def __init__(self, peer: str = "ipv4:127.0.0.1:50000"):
        self._peer = peer
        self.code: grpc.StatusCode | None = None

    def peer(self) -> str:
        return self._peer

    def abort(self, code: grpc.StatusCode, details: str) -> None:
        self.code = code
        raise Aborted(code, details)

    def abort_with_status(self, status: Any) -> None:
        raise Aborted(status.code, status.details)

    def invocation_metadata(self) -> tuple:
        return ()

    def auth_context(self) -> dict:
        return {}

    def peer_identities(self) -> None:
        return None

    def peer_identity_key(self) -> None:
        return None

    def time_remaining(self) -> float:
        return 30.0

    def is_active(self) -> bool:
        return True

    def add_callback(self, callback: Any) -> bool:
        return True

    def set_code(self, code: grpc.StatusCode) -> None:
        self.code = code

    def set_details(self, details: str) -> None:
        pass

    def set_trailing_metadata(self, metadata: Any) -> None:
        pass

    def send_initial_metadata(self, metadata: Any) -> None:
        pass


class _RigTransport(GrpcTransport):
    """A transport whose `wait_released` lets the rig play the engine first (no thread)."""

    rig: "ServicerRig"

    def wait_released(self, client: str, round: int, timeout_s: float) -> bool:
        self.rig.drain()
        return super().wait_released(client, round, 0.0)


class ServicerRig:
    def __init__(self, spec: dict[str, TensorSpec]):
        self.spec = spec
        self.transport = _RigTransport(["aws", "gcp"])
        self.transport.rig = self
        self.servicer = FederationServicer(
            self.transport, "model: {}\n", {}, {"aws": TOKEN, "gcp": "gcp-secret-token"}, MAX_UPDATE_BYTES, CHUNK
        )
        reply = self.servicer.Register(
            pb.RegisterRequest(protocol_version=PROTOCOL_VERSION, name="aws", token=TOKEN, num_tokens=1000), FakeContext()
        )
        self.session = reply.session_id
        self.round = 0
        self.decoded = 0  # updates the engine side decoded successfully

    def header(self, payload_bytes: int, **fields: Any) -> pb.UpdateHeader:
        values = dict(
            protocol_version=PROTOCOL_VERSION, name="aws", session_id=self.session, round=self.round, base_version=0,
            num_tokens=100, train_loss=1.5, compute_s=0.1, payload_bytes=payload_bytes,
        )
        values.update(fields)
        return pb.UpdateHeader(**values)

    def push(self, chunks: list[bytes], call: Callable[[list[bytes]], str] | None = None) -> str:
        """One PushUpdate call on the current round; 'accepted', 'duplicate' or 'aborted:CODE'.

        `call` sends the chunks another way (a real gRPC channel) and returns the same
        strings. Exceptions other than `Aborted` and `SkyfedError` propagate."""
        self.transport.send("aws", TrainTask(self.round, 0, b"", 1))
        try:
            if call is not None:
                return call(chunks)
            reply = self.servicer.PushUpdate(iter(chunks), FakeContext())
            return "duplicate" if reply.duplicate else "accepted"
        except Aborted as exc:
            return f"aborted:{exc.code.name}"
        finally:
            self.drain()
            self.round += 1

    def drain(self) -> None:
        """Play the engine: decode every queued result as the engine does, then release it."""
        while True:
            result = self.transport.receive(0)
            if result is None:
                return
            try:
                if result.error is None and result.payload is not None:
                    decode_payload(result.payload, self.spec, MAX_UPDATE_BYTES, f"update from {result.client}", views=True)
                    self.decoded += 1
            except SkyfedError:
                pass
            finally:
                result.payload = None
                self.transport.release(result)


# ------------------------------------------------------------ hostile streams

_STRINGS = ["", "gcp", "aws\x00", "a" * 10_000, "\u00e9\u4e2d", "../../etc/passwd", "aws "]
_META = [
    "[" * 100_000 + "]" * 100_000, '{"a":' * 3000 + "1" + "}" * 3000, '{"x":Infinity}', '{"x":NaN}',
    '{"x":' + "9" * 5000 + "}", "not json", "[1,2]", '"s"', '{"a":"' + "x" * 100_000 + '"}', '{"ok":1}',
]
_INTS64 = [0, -1, 1, -(2**63), 2**63 - 1, 2**31, -(10**12), 10**12]
_INTS32 = [0, -1, 1, -(2**31), 2**31 - 1, 7]
_FLOATS = [float("nan"), float("inf"), float("-inf"), -1.0, 1e308, 0.0]


def _hostile_header(rng: random.Random, rig: ServicerRig, size: int, meta: bool = True) -> pb.UpdateHeader:
    fields: dict[str, Any] = {}
    names = ["protocol_version", "name", "session_id", "round", "base_version", "num_tokens", "train_loss",
             "holdout_loss", "compute_s", "error", "payload_bytes", "payload_bytes"]
    for _ in range(rng.randint(1, 3)):
        which = rng.choice(names + (["meta_json", "meta_json"] if meta else []))
        if which == "protocol_version":
            fields[which] = rng.choice([0, 2, 2**32 - 1])
        elif which in ("name", "session_id", "error"):
            fields[which] = rng.choice(_STRINGS + ([rig.session + "x"] if which == "session_id" else []))
        elif which in ("round", "base_version"):
            fields[which] = rng.choice(_INTS32 + [rig.round - 1, rig.round + 1])
        elif which == "num_tokens":
            fields[which] = rng.choice(_INTS64)
        elif which in ("train_loss", "holdout_loss", "compute_s"):
            fields[which] = rng.choice(_FLOATS)
            if which == "holdout_loss":
                fields["has_holdout_loss"] = True
        elif which == "payload_bytes":
            fields[which] = rng.choice(_INTS64 + [size - 1, size + 1, MAX_UPDATE_BYTES, MAX_UPDATE_BYTES + 1, 2**40])
        else:
            fields[which] = rng.choice(_META + ['{"t":' + t + "}" for t in HOSTILE_TOKENS[:12]])
    return rig.header(fields.pop("payload_bytes", size), **fields)


def _data_chunks(rng: random.Random, payload: bytes, tiny: bool) -> list[bytes]:
    size = rng.choice([CHUNK, 1000, len(payload) or 1] + ([1, 7] if tiny else []))
    return [encode_data_chunk(payload[i : i + size]) for i in range(0, len(payload), size)]


def _garbage(rng: random.Random) -> bytes:
    return rng.choice([
        b"", b"\x12", b"\x12\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff", b"\x0a\x05abc", b"\xff" * 8,
        rng.randbytes(rng.randint(1, 64)), b"\x12\x03ab", b"\x0a\x00\x12\x00", b"\x08\x01",
    ])


def hostile_stream(
    rng: random.Random, rig: ServicerRig, payload: bytes, meta: bool = True, tiny_chunks: bool = True
) -> tuple[str, list[bytes]]:
    """(what was changed, chunk bytes) of one mutated PushUpdate stream carrying `payload`;
    `meta=False` leaves meta_json alone; `tiny_chunks=False` keeps data chunks of 1000
    bytes or more (tens of thousands of 1-byte messages take seconds over real gRPC)."""
    kind = rng.choice(["header", "header", "framing", "payload", "payload", "payload_resized", "mixed"])
    if kind in ("payload", "payload_resized", "mixed"):
        _, payload = mutate(rng, payload)
    announced = len(payload) if kind != "payload" else rng.choice([len(payload), max(1, len(payload) - 3)])
    header = _hostile_header(rng, rig, announced, meta) if kind in ("header", "mixed") else rig.header(announced)
    chunks = [pb.UpdateChunk(header=header).SerializeToString(), *_data_chunks(rng, payload, tiny_chunks)]
    if kind in ("framing", "mixed"):
        for _ in range(rng.randint(1, 3)):
            action = rng.randrange(6)
            if action == 0 and chunks:
                chunks.pop(0)  # no header
            elif action == 1:
                chunks.insert(rng.randint(0, len(chunks)), pb.UpdateChunk(header=rig.header(announced)).SerializeToString())
            elif action == 2:
                chunks.insert(rng.randint(0, len(chunks)), _garbage(rng))
            elif action == 3 and len(chunks) > 1:
                chunks.pop(rng.randrange(1, len(chunks)))  # a data chunk lost
            elif action == 4:
                chunks.append(encode_data_chunk(rng.randbytes(rng.randint(0, 32))))  # more than announced
            else:
                chunks = chunks[:1]  # header only
    return kind, chunks
