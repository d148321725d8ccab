"""The gRPC servicer: the server's front door. It authenticates every call before it
reads anything, bounds calls, streams tasks out and updates in.

Order of the checks on every call (docs/security.md has the table):

1. calls in progress from the peer's address (IP) < `max_calls_per_peer`, else
   RESOURCE_EXHAUSTED;
2. the protocol version in the call's metadata, else FAILED_PRECONDITION;
3. the client name in the metadata is a configured client, else UNAUTHENTICATED;
4. with mutual TLS, the client certificate names that client, else UNAUTHENTICATED;
5. Register: the client's token (unless the server runs `--open`; then a name held
   by a live session from another address is refused with ALREADY_EXISTS);
   later calls: the session id Register returned; else UNAUTHENTICATED;
6. calls in progress for the client < `max_calls_per_client`, else RESOURCE_EXHAUSTED;
7. only then the first request message is read, under the watchdog (`limits.py`):
   a call that waits for its peer longer than `idle_timeout_s`, or runs longer than
   `stream_timeout_s`, is cancelled.

A push then passes the round rules of `GrpcTransport` (the client's open round, the
model version it was sent, one push per round: FAILED_PRECONDITION / ALREADY_EXISTS),
one upload per client at a time (ABORTED), the announced size (at most what the model
and the uplink codec chain can produce, and `federation.max_update_bytes`:
RESOURCE_EXHAUSTED, before any byte is allocated), the framing and CRC-32, and the
payload's own header (kind, round, client, base version: INVALID_ARGUMENT, so an old
update re-labelled for a new round is refused). Any other exception while handling a
message is one log line and INTERNAL: nothing a client sends ends the server.

A refused update for an open round is also handed to the engine as a failed result, so
the round records the rejection and does not wait for that client; the global model is
never touched by it. An update the engine rejects (e.g. NaN values) is answered with
`accepted=False` and the engine's reason.

Secure aggregation's control answers (keys, shares, unmask; `meta_json` says
``{"secagg_stage": STAGE}``) are pushes too and pass every check above, with the stage
as part of the round rules (the client's open task must be that stage; one push per
round and stage), a size bound of their own (`max_control_bytes` of the clients'
names), and their payload's header checked for kind "secagg", the stage, the round, the
authenticated client and an empty tensor blob. The result carries the authenticated
name, so the coordinator relays keys and shares under it, never a name the message
claims. A control answer the protocol refuses is answered with INVALID_ARGUMENT and the
reason.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import unquote

import grpc
from google.protobuf.message import DecodeError

from skyfed.compression import strictjson
from skyfed.compression.framing import FrameReader
from skyfed.compression.wire import TensorSpec
from skyfed.errors import AuthError, PayloadTooLargeError, SkyfedError, WireFormatError
from skyfed.federation.messages import ClientResult, TrainTask
from skyfed.heap import release_free_memory
from skyfed.runtime.grpc import PROTOCOL_VERSION, skyfed_pb2 as pb
from skyfed.runtime.grpc import skyfed_pb2_grpc as pb_grpc
from skyfed.runtime.grpc.auth import (
    META_NAME, META_PROTOCOL, META_SESSION, META_TOKEN, check_certificate, check_token, metadata_dict,
    new_session_id, same_secret,
)
from skyfed.runtime.grpc.chunks import Assembler, Pipeline, iter_views
from skyfed.runtime.grpc.limits import CallBounds, CallLimits, LimitExceeded, Ticket, Watchdog
from skyfed.runtime.grpc.monitor import NO_MONITOR
from skyfed.runtime.grpc.rawchunks import data_of, encode_data_chunk
from skyfed.runtime.grpc.transport import (
    CONTROL_STAGES, STAGE_META, UPDATE, AlreadyReceivedError, GrpcTransport, RoundClosedError,
)
from skyfed.security.secagg.messages import check_control_header, max_control_bytes

log = logging.getLogger(__name__)

MAX_PULL_WAIT_S = 60.0
# A push is answered once the engine has folded the update (backpressure, see
# `GrpcTransport`), or after this long when the engine is busy elsewhere (evaluating).
RELEASE_WAIT_S = 30.0
MAX_META_JSON = 64 * 2**10

Code = grpc.StatusCode


class Refusal(Exception):
    """Refuse the current call with this status and message."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


class BusyError(SkyfedError):
    """Another upload from the same client is still in progress."""


def _code_of(exc: SkyfedError) -> grpc.StatusCode:
    if isinstance(exc, PayloadTooLargeError):
        return Code.RESOURCE_EXHAUSTED
    if isinstance(exc, AuthError):
        return Code.UNAUTHENTICATED
    if isinstance(exc, AlreadyReceivedError):
        return Code.ALREADY_EXISTS
    if isinstance(exc, RoundClosedError):
        return Code.FAILED_PRECONDITION
    if isinstance(exc, BusyError):
        return Code.ABORTED
    return Code.INVALID_ARGUMENT


def peer_address(peer: str) -> str:
    """The IP of a gRPC peer string ("ipv4:1.2.3.4:5678", "ipv6:[::1]:5678", or with the
    brackets %-encoded), port dropped."""
    kind, _, rest = unquote(peer).partition(":")
    if kind == "ipv6" and rest.startswith("["):
        return rest[1 : rest.find("]")] if "]" in rest else rest
    if kind == "ipv4":
        return rest.rpartition(":")[0] or rest
    return peer  # unix sockets and the like: the whole string


class _Call:
    """One admitted call: who, from where, its watchdog ticket and what to undo at its end."""

    def __init__(self, method: str, peer: str):
        self.method = method
        self.peer = peer
        self.name: str | None = None
        self.ticket: Ticket | None = None
        self.counted_peer = False
        self.counted_client = False
        self.pending: ClientResult | None = None  # an update to record as refused if the call fails
        self.uploading = False

    def describe(self) -> str:
        who = f"client {self.name!r}" if self.name else "an unidentified caller"
        return f"{self.method} of {who} from {self.peer}"


class FederationServicer(pb_grpc.FederationServicer):
    def __init__(
        self,
        transport: GrpcTransport,
        config_yaml: str | dict[str, str],
        tokenizer_files: dict[str, bytes],
        tokens: dict[str, str] | None,
        max_update_bytes: int,
        chunk_bytes: int,
        bounds: CallBounds | None = None,
        mutual_tls: bool = False,
    ):
        """`config_yaml`: one YAML for every client, or {client name: its YAML}
        (`client_config.client_config`). `tokens` None: the server runs open."""
        self.transport = transport
        self.config_yaml = config_yaml
        self.monitor = NO_MONITOR  # Prometheus counters (runtime/grpc/monitor.py); run_server sets a ServerMonitor
        self.tokenizer_files = tokenizer_files
        self.tokens = tokens
        self.max_update_bytes = max_update_bytes
        self.update_limit = max_update_bytes  # lowered by `limit_update_size` once the model is known
        self.update_limit_why = f"federation.max_update_bytes={max_update_bytes}"
        # secure aggregation's control answers: bounded by the session's size, whatever the model
        self.control_limit = min(max_update_bytes, max_control_bytes(list(transport.clients)))
        self.control_limit_why = (f"a secure-aggregation control message among {len(transport.clients)} clients "
                                  f"takes at most {self.control_limit} bytes")
        self.chunk_bytes = chunk_bytes
        self.bounds = bounds or CallBounds()
        self.mutual_tls = mutual_tls
        self.limits = CallLimits(self.bounds.max_calls_per_client, self.bounds.max_calls_per_peer)
        self.watchdog = Watchdog(self.bounds.stream_timeout_s, self.bounds.idle_timeout_s)
        self._lock = threading.Lock()
        self._seen: dict[str, tuple[str, float]] = {}  # client -> (peer address, last authenticated call)
        self._uploading: set[str] = set()

    def close(self) -> None:
        self.watchdog.close()

    def limit_update_size(self, spec: dict[str, TensorSpec], uplink_specs: list[Any]) -> int:
        """Refuse announcements above what `spec` through the uplink chain can take on the wire."""
        from skyfed.compression.bounds import max_payload_bytes
        from skyfed.compression.chain import Chain

        bound = max_payload_bytes(spec, Chain.from_specs(uplink_specs), list(self.transport.clients))
        if bound < self.max_update_bytes:
            self.update_limit = bound
            self.update_limit_why = (
                f"the largest update this model and uplink codec chain can produce is {bound} bytes; "
                f"federation.max_update_bytes={self.max_update_bytes}"
            )
        log.info("updates larger than %d bytes are refused from their announcement", self.update_limit)
        return self.update_limit

    # ------------------------------------------------------------ the front door

    def _admit(self, call: _Call, context: grpc.ServicerContext) -> None:
        """Steps 1-6 of the module docstring, from the call's metadata alone (fills `call`)."""
        method = call.method
        try:
            self.limits.enter_peer(call.peer)
        except LimitExceeded as exc:
            raise Refusal(Code.RESOURCE_EXHAUSTED, str(exc)) from None
        call.counted_peer = True
        try:
            meta = metadata_dict(context.invocation_metadata())
            self._check_version(meta.get(META_PROTOCOL))
            name = meta.get(META_NAME, "")
            if name not in self.transport.clients:
                name = _shown(name)  # not a client: only quoted in the refusal, cut short
                if method != "Register":
                    self._check_session(name, "")
                if self.tokens is not None:  # the same answer as a wrong token: names are not enumerable
                    check_token(self.tokens, name, meta.get(META_TOKEN, ""))
                raise Refusal(Code.UNAUTHENTICATED, f"client {name!r} is not one of this experiment's clients")
            call.name = name
            check_certificate(context.auth_context(), name, self.mutual_tls)
            if method == "Register":
                check_token(self.tokens, name, meta.get(META_TOKEN, ""))
                if self.tokens is None:
                    self._check_takeover(name, call.peer)
            else:
                self._check_session(name, meta.get(META_SESSION, ""))
            try:
                self.limits.enter_client(name)
            except LimitExceeded as exc:
                raise Refusal(Code.RESOURCE_EXHAUSTED, str(exc)) from None
            call.counted_client = True
            with self._lock:
                self._seen[name] = (call.peer, time.monotonic())
            call.ticket = self.watchdog.watch(context.cancel, call.describe())
        except BaseException:
            self._leave(call)
            raise

    def _leave(self, call: _Call) -> None:
        if not call.counted_peer:
            return
        call.counted_peer = False
        if call.ticket is not None:
            self.watchdog.forget(call.ticket)
        if call.uploading:
            with self._lock:
                self._uploading.discard(call.name)
        if call.counted_client:
            self.limits.leave_client(call.name)
        self.limits.leave_peer(call.peer)

    def _check_version(self, value: str | None) -> None:
        try:
            version = int(value) if value is not None else None
        except ValueError:
            version = None
        if version != PROTOCOL_VERSION:
            raise Refusal(
                Code.FAILED_PRECONDITION,
                f"protocol version {_shown(value) if value is not None else 'missing'} is not supported: this server speaks "
                f"skyfed protocol version {PROTOCOL_VERSION}; install a matching skyfed on the client",
            )

    def _check_session(self, name: str, session_id: str) -> None:
        expected = self.transport.session_of(name)
        if expected is None or not same_secret(session_id, expected):
            raise AuthError(
                f"unknown session for client {name!r} (not registered, replaced or server restarted): register again"
            )
        self.monitor.seen(name)

    def _check_takeover(self, name: str, peer: str) -> None:
        """Open server: a name whose session is live from another address stays with it."""
        with self._lock:
            seen = self._seen.get(name)
        if seen is None or seen[0] == peer or self.transport.session_of(name) is None:
            return
        idle = time.monotonic() - seen[1]
        if idle < self.bounds.session_ttl_s or self.limits.active(name) > 0:
            raise Refusal(
                Code.ALREADY_EXISTS,
                f"client {name!r} has a live session from another address; an open server gives its name to another "
                f"address only after {self.bounds.session_ttl_s:g}s without a call (--session-ttl)",
            )

    def _refuse(self, context: grpc.ServicerContext, call: _Call, refusal: Refusal) -> None:
        log.warning("refused %s: %s (%s)", call.describe(), refusal.message, refusal.code.name)
        self.monitor.refused(refusal.code.name)
        context.abort(refusal.code, refusal.message)

    def _failed(self, call: _Call, exc: BaseException) -> Refusal | None:
        """The refusal for an exception raised while handling a call (None: it was cancelled)."""
        if isinstance(exc, grpc.RpcError):  # cancelled by the watchdog (which logged it) or by the client
            if call.ticket is None or call.ticket.reason is None:
                log.warning("%s ended: the client cancelled it or went away", call.describe())
            refusal = None
        elif isinstance(exc, Refusal):
            refusal = exc
        elif isinstance(exc, SkyfedError):
            refusal = Refusal(_code_of(exc), str(exc))
        else:
            log.error("error handling %s: %s: %s", call.describe(), type(exc).__name__, exc)
            refusal = Refusal(Code.INTERNAL, f"the server could not handle this message ({type(exc).__name__}); it is refused")
        if call.pending is not None:
            if refusal is not None:  # a cancelled upload may be sent again; a refused one may not
                self._record_refusal(call.pending, refusal.message)
            call.pending = None
        return refusal

    def _serve(self, method: str, context: grpc.ServicerContext, body: Callable[[_Call], Any], empty: Any) -> Any:
        """Admit, run `body`, and turn anything it raises into one log line and a status
        (`empty`: the reply of a call that was cancelled, which nobody reads)."""
        call = _Call(method, peer_address(context.peer()))
        try:
            self._admit(call, context)
            return body(call)
        except Exception as exc:  # every exception becomes a refusal of this call
            refusal = self._failed(call, exc)
        finally:
            self._leave(call)
        if refusal is not None:
            self._refuse(context, call, refusal)
        return empty

    def _first(self, call: _Call, request_iterator: Iterator[bytes]) -> bytes:
        """The call's first request message, waited for under the watchdog."""
        call.ticket.waiting()
        try:
            raw = next(request_iterator, None)
        finally:
            call.ticket.done_waiting()
        if raw is None:
            raise Refusal(Code.INVALID_ARGUMENT, f"{call.method}: the call ended before its request message")
        return raw

    @staticmethod
    def _parse(cls, raw: bytes, what: str):
        try:
            return cls.FromString(raw)
        except DecodeError as exc:
            raise WireFormatError(f"malformed {what}: {exc}") from None

    @staticmethod
    def _same_name(call: _Call, name: str) -> None:
        if name != call.name:
            raise Refusal(Code.INVALID_ARGUMENT, f"the request names client {_shown(name)!r}, but the call is client {call.name!r}'s")

    # ------------------------------------------------------------ RPCs

    def Register(self, request_iterator: Iterator[bytes], context: grpc.ServicerContext) -> pb.RegisterReply:
        return self._serve("Register", context, lambda call: self._register(call, request_iterator, context), pb.RegisterReply())

    def _register(self, call: _Call, request_iterator: Iterator[bytes], context: grpc.ServicerContext) -> pb.RegisterReply:
        request = self._parse(pb.RegisterRequest, self._first(call, request_iterator), "RegisterRequest")
        self._same_name(call, request.name)
        name = call.name
        session = new_session_id()
        rec = self.transport.register(name, session, max(0, int(request.num_tokens)))
        self.monitor.registered(name)
        log.info("client %s registered from %s (%d training tokens)", name, call.peer, rec.num_tokens)
        config = self.config_yaml if isinstance(self.config_yaml, str) else self.config_yaml[name]
        return pb.RegisterReply(
            protocol_version=PROTOCOL_VERSION,
            session_id=session,
            client_index=rec.index,
            config_yaml=config,
            tokenizer_files=self.tokenizer_files,
            chunk_bytes=self.chunk_bytes,
        )

    def PullTask(self, request_iterator: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes | pb.TaskChunk]:
        call = _Call("PullTask", peer_address(context.peer()))
        refusal = None
        try:
            self._admit(call, context)
            yield from self._pull(call, request_iterator)
        except Exception as exc:  # every exception becomes a refusal of this call
            refusal = self._failed(call, exc)
        finally:
            self._leave(call)
        if refusal is not None:
            self._refuse(context, call, refusal)

    def _pull(self, call: _Call, request_iterator: Iterator[bytes]) -> Iterator[bytes | pb.TaskChunk]:
        request = self._parse(pb.PullRequest, self._first(call, request_iterator), "PullRequest")
        self._same_name(call, request.name)
        wait = min(max(0.0, request.wait_s), MAX_PULL_WAIT_S) if request.wait_s == request.wait_s else 0.0
        task = self.transport.next_task(call.name, wait)
        if task is False:
            yield pb.TaskChunk(header=pb.TaskHeader(status=pb.DONE, message="training is over"))
            return
        if task is None:
            yield pb.TaskChunk(header=pb.TaskHeader(status=pb.WAIT))
            return
        assert isinstance(task, TrainTask)
        call.ticket.waiting()  # from here on the call waits for the client to take each message
        yield pb.TaskChunk(header=pb.TaskHeader(
            status=pb.TASK, round=task.round, version=task.version, steps=task.steps,
            options_json=json.dumps(task.options), payload_bytes=len(task.payload),
        ))
        for view in iter_views(task.payload, self.chunk_bytes):
            call.ticket.waiting()
            yield encode_data_chunk(view)
        self.monitor.task_sent(call.name, task.round, len(task.payload))

    def PushUpdate(self, request_iterator: Iterator[bytes], context: grpc.ServicerContext) -> pb.PushReply:
        return self._serve("PushUpdate", context, lambda call: self._push(call, request_iterator), pb.PushReply())

    def _push(self, call: _Call, request_iterator: Iterator[bytes]) -> pb.PushReply:
        kind, h = _parts(self._first(call, request_iterator))
        if kind != "header":
            raise Refusal(Code.INVALID_ARGUMENT, "an update stream must start with its header")
        self._same_name(call, h.name)
        name, round = call.name, h.round
        what = f"update from {name} for round {round}"
        if h.num_tokens < 0:
            raise WireFormatError(f"{what}: a negative token count ({h.num_tokens})")
        meta = _meta(h.meta_json, what)
        stage = _stage(meta, what)
        if stage != UPDATE:
            what = f"{stage} answer from {name} for round {round}"
        self.transport.check_open(name, round, h.base_version, stage)
        with self._lock:
            if name in self._uploading:
                raise BusyError(f"{what}: another upload from {name} is in progress; one at a time")
            self._uploading.add(name)
            call.uploading = True
        result = ClientResult(
            client=name, round=round, base_version=h.base_version, payload=None, num_tokens=int(h.num_tokens),
            train_loss=h.train_loss, holdout_loss=h.holdout_loss if h.has_holdout_loss else None,
            compute_s=h.compute_s, error=h.error or None, meta=meta,
        )
        call.pending = result  # from here on, a failure is recorded as this round's refused update
        if result.error is None:
            limit, why = self.update_limit, self.update_limit_why
            if stage != UPDATE:
                limit, why = self.control_limit, self.control_limit_why
            if h.payload_bytes > limit:
                raise PayloadTooLargeError(f"{what}: {h.payload_bytes} bytes exceeds the limit: {why}")
            if h.payload_bytes <= 0:
                raise WireFormatError(f"{what}: announced size {h.payload_bytes} is not positive")
            try:
                result.payload = self._receive(call, request_iterator, h, what, stage, limit)
            finally:
                release_free_memory()  # the chunks' memory, kept by this thread's arena
        call.pending = None
        self.transport.submit(result)
        del result  # the engine owns the payload now (this thread holds no other reference)
        verdict = self.transport.wait_released(name, round, RELEASE_WAIT_S, stage)
        if stage != UPDATE:
            if verdict.rejection is not None:  # the protocol refused the message
                raise Refusal(Code.INVALID_ARGUMENT, f"{what} refused: {verdict.rejection}")
            log.info("received the round %d %s answer of %s (%d bytes)", round, stage, name, h.payload_bytes)
            return pb.PushReply(accepted=True, message=f"round {round} {stage} answer received")
        if verdict.rejection is not None:
            log.warning("told %s that its round %d update was rejected: %s", name, round, verdict.rejection)
            return pb.PushReply(accepted=False, message=f"round {round} update rejected: {verdict.rejection}")
        if not verdict.released:
            log.info("the round %d update of %s is still queued; answering its push", round, name)
        log.info("received the round %d update of %s (%d bytes)", round, name, h.payload_bytes)
        self.monitor.update_received(name, round, h.payload_bytes)
        return pb.PushReply(accepted=True, message=f"round {round} update received")

    def _receive(self, call: _Call, request_iterator: Iterator[bytes], h: pb.UpdateHeader, what: str,
                 stage: str, limit: int):
        """The update's bytes (in memory, or spilled to a file when large: `GrpcTransport.receive_buffer`),
        framing, sizes, CRC-32 and header checked as the chunks arrive (`FrameReader`, on a
        helper thread: `Pipeline`): the engine's decode does not check the CRC again. A
        plain update's tensors and values are checked on the way too, by the engine's
        own rules (`GrpcTransport.blob_check`); the engine turns a problem into its rejection.
        A secure-aggregation control answer is small: kept in memory, its header checked."""
        update = stage == UPDATE
        frame = FrameReader(h.payload_bytes, limit, what, self.transport.blob_check if update else None)
        buf = self.transport.receive_buffer(h.payload_bytes, what) if update else Assembler(h.payload_bytes, what)

        def consume(data: memoryview) -> None:
            frame.feed(data)
            buf.add(data)

        pipe = Pipeline(consume)
        try:
            while True:
                call.ticket.waiting()
                try:
                    item = next(request_iterator, None)
                finally:
                    call.ticket.done_waiting()
                if item is None:
                    break
                kind, data = _parts(item)
                if kind != "data":
                    raise WireFormatError(f"{what}: a second header inside the stream")
                pipe.put(data)
                del item, data  # not held here while the next chunk arrives
            pipe.finish()
            header = frame.finish()
            if update:
                _check_payload_header(header, h, call.name, what)
            else:  # kind, stage, round, the authenticated client, no tensors
                check_control_header(header, h.payload_bytes - frame.blob_start, stage, h.round, call.name)
            return buf.finish(header, frame.blob_start, frame.verdict)
        except BaseException:
            pipe.abort()
            buf.close()
            raise

    def _record_refusal(self, result: ClientResult, reason: str) -> None:
        """Tell the engine (the round must not wait for this client); drop the payload."""
        result.payload, result.error = None, f"refused by the server: {reason}"
        try:
            self.transport.submit(result)
        except SkyfedError:
            pass


def _shown(text: str, limit: int = 64) -> str:
    """A client-supplied string as a refusal quotes it: at most `limit` characters."""
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _check_payload_header(header: dict[str, Any], h: pb.UpdateHeader, name: str, what: str) -> None:
    """The payload's own header must say what the push says (else: replayed or re-labelled)."""
    expected = {"kind": "update", "round": h.round, "client": name, "base_version": h.base_version}
    for key, want in expected.items():
        got = header.get(key)
        if type(got) is not type(want) or got != want:
            raise WireFormatError(f"{what}: the payload's header says {key}={_shown(repr(got))}, the push says {want!r} (a replayed or re-labelled update)")


def _stage(meta: dict, what: str) -> str:
    """The stage a push declares: "update", or a secure-aggregation control stage."""
    if STAGE_META not in meta:
        return UPDATE
    stage = meta[STAGE_META]
    if stage not in CONTROL_STAGES:
        raise WireFormatError(f"{what}: meta_json names an unknown stage {_shown(repr(stage))}")
    return stage


def _parts(item: bytes | pb.UpdateChunk) -> tuple[str | None, object]:
    """("header", UpdateHeader) or ("data", bytes view) of a raw or parsed UpdateChunk."""
    if isinstance(item, bytes):
        data = data_of(item)
        if data is not None:
            return "data", data
        try:
            item = pb.UpdateChunk.FromString(item)
        except DecodeError as exc:
            raise WireFormatError(f"malformed update chunk: {exc}") from None
    kind = item.WhichOneof("part")
    return kind, (item.header if kind == "header" else item.data)


def _meta(text: str, what: str) -> dict:
    """The push's meta_json under the wire headers' strict rules (`strictjson`: bounded
    nesting, no NaN/Infinity, 64-bit integers, unique keys); a non-object is dropped."""
    if not text:
        return {}
    if len(text) > MAX_META_JSON:
        raise WireFormatError(f"{what}: meta_json of {len(text)} characters (at most {MAX_META_JSON})")
    value = strictjson.loads(text.encode("utf-8", "surrogatepass"), f"{what}: meta_json")
    return value if isinstance(value, dict) else {}
