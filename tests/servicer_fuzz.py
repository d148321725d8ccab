"""Drive `FederationServicer.PushUpdate` in process with hostile calls: metadata and chunk streams.

`ServicerRig` builds a real servicer over a real `GrpcTransport` with two clients, ``aws``
and ``gcp``, both registered through `Register` with their token in the call metadata,
as `runtime/grpc/client.py` does. `FakeContext` stands for `grpc.ServicerContext`: it
carries the call's metadata and peer, and its `abort` raises `Aborted`, as grpc's own
context does. `push(chunks, metadata)` opens a fresh round for ``aws``, feeds the raw
chunk bytes as the request stream (the server's PushUpdate deserializer is the
identity, so these are exactly the bytes a peer could send) under that metadata
(default: aws's protocol version, name and session) and then plays the engine: every
result the servicer queued is decoded with `decode_payload(views=True)` as the engine
does, and released. It returns the outcome; anything the servicer or the decoder
raises that is neither a skyfed error nor an abort is re-raised to the caller.

`hostile_stream(rng, rig, payload)` builds a mutated call: metadata with a missing,
garbage or foreign version, name or session, repeated keys, binary and huge values;
header fields with wrong values (names, rounds, deep or non-finite meta_json, NaN
losses, negative or huge sizes and token counts); bad framing (no header, two headers,
garbage messages, short or long data) and payloads mutated by `wire_mutations`.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable
from typing import Any

import grpc
import torch

from skyfed.compression.chain import Chain
from skyfed.compression.payload import decode_payload, encode_payload
from skyfed.compression.wire import TensorSpec
from skyfed.errors import SkyfedError
from skyfed.federation.messages import TrainTask
from skyfed.runtime.grpc import PROTOCOL_VERSION
from skyfed.runtime.grpc import skyfed_pb2 as pb
from skyfed.runtime.grpc.auth import META_NAME, META_PROTOCOL, META_SESSION, META_TOKEN, call_metadata
from skyfed.runtime.grpc.rawchunks import encode_data_chunk
from skyfed.runtime.grpc.servicer import FederationServicer
from skyfed.runtime.grpc.transport import GrpcTransport, Verdict
from wire_mutations import HOSTILE_TOKENS, mutate

TOKENS = {"aws": "aws-secret-token", "gcp": "gcp-secret-token"}
TOKEN = TOKENS["aws"]
MAX_UPDATE_BYTES = 1 << 20
CHUNK = 4096
Metadata = list[tuple[str, Any]]


class Aborted(Exception):
    """What `FakeContext.abort` raises (grpc raises a plain Exception there too)."""

    def __init__(self, code: grpc.StatusCode, details: str):
        super().__init__(f"{code.name}: {details}")
        self.code, self.details = code, details


class FakeContext:
    """The parts of `grpc.ServicerContext` the servicer uses, for in-process calls."""

    def __init__(self, metadata: Iterable[tuple[str, Any]] = (), peer: str = "ipv4:127.0.0.1:50000"):
        self._metadata = tuple(metadata)
        self._peer = peer
        self._code: grpc.StatusCode | None = None
        self.cancelled = False
        self.callbacks: list[Any] = []

    def invocation_metadata(self) -> tuple:
        return self._metadata

    def peer(self) -> str:
        return self._peer

    def auth_context(self) -> dict:
        return {}  # no TLS

    def abort(self, code: grpc.StatusCode, details: str) -> None:
        self._code = code
        raise Aborted(code, details)

    def abort_with_status(self, status: Any) -> None:
        self.abort(status.code, status.details)

    def add_callback(self, callback: Any) -> bool:
        self.callbacks.append(callback)
        return True

    def is_active(self) -> bool:
        return not self.cancelled

    def time_remaining(self) -> float:
        return 30.0

    def cancel(self) -> None:
        self.cancelled = True

    def code(self) -> grpc.StatusCode | None:
        return self._code

    def set_code(self, code: grpc.StatusCode) -> None:
        self._code = code

    def set_details(self, details: str) -> None:
        pass

    def set_trailing_metadata(self, metadata: Any) -> None:
        pass

    def send_initial_metadata(self, metadata: Any) -> None:
        pass


class _RigTransport(GrpcTransport):
    """A transport whose `wait_released` lets the rig play the engine first (no thread)."""

    rig: "ServicerRig"

    def wait_released(self, client: str, round: int, timeout_s: float, stage: str = "update") -> Verdict:
        self.rig.drain()
        return super().wait_released(client, round, 0.0, stage)


class ServicerRig:
    def __init__(self, spec: dict[str, TensorSpec]):
        self.spec = spec
        self.transport = _RigTransport(["aws", "gcp"])
        self.transport.rig = self
        self.servicer = FederationServicer(self.transport, "model: {}\n", {}, dict(TOKENS), MAX_UPDATE_BYTES, CHUNK)
        self.sessions = {name: self._register(name) for name in TOKENS}
        self.session = self.sessions["aws"]
        self.round = 0
        self.decoded = 0  # updates the engine side decoded successfully
        self.last_abort = ""  # the details of the last abort (INTERNAL names the exception the catch-all caught)

    def _register(self, name: str) -> str:
        request = pb.RegisterRequest(protocol_version=PROTOCOL_VERSION, name=name, num_tokens=1000)
        context = FakeContext(call_metadata(PROTOCOL_VERSION, name, token=TOKENS[name]))
        reply = self.servicer.Register(iter([request.SerializeToString()]), context)
        assert reply.session_id, "the rig's own registration was refused"
        return reply.session_id

    def close(self) -> None:
        self.servicer.close()

    def metadata(self) -> Metadata:
        """What aws's client sends with every PushUpdate."""
        return call_metadata(PROTOCOL_VERSION, "aws", session=self.session)

    def update(self, tensors: dict[str, torch.Tensor], chain: Chain | None = None) -> bytes:
        """A valid update payload for the round `push` opens next (the servicer checks the
        payload's own kind, round, client and base version against the push)."""
        return encode_payload(tensors, chain, kind="update", round=self.round, client="aws", base_version=0)

    def header(self, payload_bytes: int, **fields: Any) -> pb.UpdateHeader:
        values = dict(
            protocol_version=PROTOCOL_VERSION, name="aws", session_id=self.session, round=self.round, base_version=0,
            num_tokens=100, train_loss=1.5, compute_s=0.1, payload_bytes=payload_bytes,
        )
        values.update(fields)
        return pb.UpdateHeader(**values)

    def push(
        self,
        chunks: Iterable[bytes],
        call: Callable[[list[bytes], Metadata], str] | None = None,
        metadata: Metadata | None = None,
    ) -> str:
        """One PushUpdate call on the current round: 'accepted', 'rejected' (by the engine),
        'duplicate' or 'aborted:CODE'.

        `metadata` None: aws's own. `call` sends the chunks another way (a real gRPC
        channel) and returns the same strings. Exceptions other than `Aborted` and
        `SkyfedError` propagate."""
        self.transport.send("aws", TrainTask(self.round, 0, b"", 1))
        metadata = self.metadata() if metadata is None else metadata
        try:
            if call is not None:
                return call(list(chunks), metadata)
            reply = self.servicer.PushUpdate(iter(chunks), FakeContext(metadata))
            return "duplicate" if reply.duplicate else "accepted" if reply.accepted else "rejected"
        except Aborted as exc:
            self.last_abort = exc.details
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


_VERSIONS = ["", "1", "3", "0", "-2", "02", " 2", "2 ", "+2", "2.0", "x", "9" * 5000, str(2**64), "\u0662"]
_NAMES = ["", "gcp", "oracle", "AWS", "aws ", "aws\x00", "a" * 100_000, "\u00e9\u4e2d", "../../etc/passwd"]


def _wire_safe(value: Any) -> bool:
    """What a real gRPC client can send as a text metadata value (printable ASCII)."""
    return isinstance(value, str) and all(" " <= c <= "~" for c in value)


def hostile_metadata(rng: random.Random, rig: ServicerRig, wire_safe: bool = False) -> tuple[str, Metadata]:
    """(what was changed, metadata) of one mutated PushUpdate call from aws; `wire_safe`
    keeps values a real gRPC client can send (printable ASCII text, lower-case keys)."""
    meta = dict(rig.metadata())
    sessions = [rig.sessions["gcp"], rig.session + "x", rig.session[:-1], rig.session.upper(), "", "x" * 100_000,
                rig.session + "\x00"]
    kind = rng.choice(["drop", "version", "name", "session", "name_and_session", "repeated", "binary", "huge",
                       "many_keys", "token_instead"])
    extra: Metadata = []
    if kind == "drop":
        del meta[rng.choice([META_PROTOCOL, META_NAME, META_SESSION])]
    elif kind == "version":
        meta[META_PROTOCOL] = rng.choice(_VERSIONS)
    elif kind == "name":
        meta[META_NAME] = rng.choice(_NAMES)
    elif kind == "session":
        meta[META_SESSION] = rng.choice(sessions)
    elif kind == "name_and_session":  # gcp's valid identity on a push that names aws in its header
        meta[META_NAME], meta[META_SESSION] = "gcp", rig.sessions["gcp"]
    elif kind == "repeated":  # a bad value first (the server reads the first), or after the good one
        key = rng.choice([META_PROTOCOL, META_NAME, META_SESSION])
        bad = rng.choice({META_PROTOCOL: _VERSIONS, META_NAME: _NAMES, META_SESSION: sessions}[key])
        items = list(meta.items())
        i = next(j for j, (k, _) in enumerate(items) if k == key)
        items.insert(i + rng.randint(0, 1), (key, bad))
        return f"metadata/{kind}", [kv for kv in items if not wire_safe or _wire_safe(kv[1])]
    elif kind == "binary":
        key = rng.choice([META_PROTOCOL, META_NAME, META_SESSION])
        if wire_safe:  # the key moved to a binary one: the text key is missing
            extra.append((key + "-bin", meta.pop(key).encode()))
        else:
            meta[key] = str(meta[key]).encode()  # bytes where text is expected
    elif kind == "huge":
        key = rng.choice([META_PROTOCOL, META_NAME, META_SESSION, "x-padding"])
        meta[key] = rng.choice(["7" * 100_000, "a" * 20_000, rig.session * 1000])
    elif kind == "many_keys":
        extra.extend((f"x-k{i}", "v" * 10) for i in range(rng.choice([100, 1000])))
    else:
        meta[META_TOKEN] = TOKEN  # the token is for Register; a push must carry the session
        if rng.random() < 0.5:
            del meta[META_SESSION]
    items = list(meta.items()) + extra
    if wire_safe:
        items = [(k, v) for k, v in items if k.endswith("-bin") or _wire_safe(v)]
    return f"metadata/{kind}", items


def hostile_stream(
    rng: random.Random, rig: ServicerRig, payload: bytes, meta: bool = True, tiny_chunks: bool = True,
    metadata: bool = True, wire_safe: bool = False,
) -> tuple[str, list[bytes], Metadata]:
    """(what was changed, chunk bytes, call metadata) of one mutated PushUpdate call carrying
    `payload`; `meta=False` leaves meta_json alone; `tiny_chunks=False` keeps data chunks
    of 1000 bytes or more (tens of thousands of 1-byte messages take seconds over real
    gRPC); `metadata=False` keeps aws's own metadata; `wire_safe`: metadata values a real
    gRPC client can send."""
    kinds = ["header", "header", "framing", "payload", "payload", "payload_resized", "mixed"]
    kind = rng.choice(kinds + (["metadata", "metadata"] if metadata else []))
    call_meta = rig.metadata()
    if kind == "metadata" or (kind == "mixed" and metadata and rng.random() < 0.3):
        what, call_meta = hostile_metadata(rng, rig, wire_safe)
        if kind == "metadata":
            chunks = [pb.UpdateChunk(header=rig.header(len(payload))).SerializeToString(), *_data_chunks(rng, payload, tiny_chunks)]
            return what, chunks, call_meta
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
    return kind, chunks, call_meta
