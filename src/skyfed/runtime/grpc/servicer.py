"""The gRPC servicer: authenticates clients, streams tasks out and updates in.

Every refusal is logged here and sent back as a gRPC status with a message saying why:

- UNAUTHENTICATED      unknown client, wrong token, unknown or replaced session;
- FAILED_PRECONDITION  another protocol version; an update for a round that is not open;
- RESOURCE_EXHAUSTED   an update larger than `federation.max_update_bytes` (refused
                       from its header, before any byte of it is buffered);
- INVALID_ARGUMENT     malformed framing: no header, more or fewer bytes than announced,
                       bad magic, truncated, CRC mismatch (`compression.wire.read_header`).

A refused update for an open round is also handed to the engine as a failed result, so
the round records the rejection and does not wait for that client; the global model is
never touched by it (the engine's decode path validates names, shapes and values too).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator

import grpc
from google.protobuf.message import DecodeError

from skyfed.compression.wire import read_header
from skyfed.errors import AuthError, PayloadTooLargeError, WireFormatError
from skyfed.federation.messages import ClientResult, TrainTask
from skyfed.runtime.grpc import PROTOCOL_VERSION, skyfed_pb2 as pb
from skyfed.runtime.grpc import skyfed_pb2_grpc as pb_grpc
from skyfed.runtime.grpc.auth import check_token, new_session_id, same_secret
from skyfed.runtime.grpc.chunks import Assembler, iter_views
from skyfed.runtime.grpc.rawchunks import data_of, encode_data_chunk
from skyfed.runtime.grpc.transport import GrpcTransport, RoundClosedError
from skyfed.runtime.grpc.monitor import NO_MONITOR  # ops: metrics hooks
from skyfed.runtime.grpc.transport import GrpcTransport, RoundClosedError, stage_of

log = logging.getLogger(__name__)

MAX_PULL_WAIT_S = 60.0
# A push is answered once the engine has folded the update (backpressure, see
# `GrpcTransport`), or after this long when the engine is busy elsewhere (evaluating).
RELEASE_WAIT_S = 30.0


class FederationServicer(pb_grpc.FederationServicer):
    def __init__(
        self,
        transport: GrpcTransport,
        config_yaml: str,
        tokenizer_files: dict[str, bytes],
        tokens: dict[str, str] | None,
        max_update_bytes: int,
        chunk_bytes: int,
    ):
        self.transport = transport
        self.config_yaml = config_yaml
        self.tokenizer_files = tokenizer_files
        self.tokens = tokens
        self.max_update_bytes = max_update_bytes
        self.chunk_bytes = chunk_bytes
        self.monitor = NO_MONITOR  # ops: metrics hooks (runtime/grpc/monitor.py); run_server sets a ServerMonitor

    # ------------------------------------------------------------ checks

    def _refuse(self, context: grpc.ServicerContext, code: grpc.StatusCode, message: str) -> None:
        log.warning("refused %s: %s (%s)", context.peer(), message, code.name)
        self.monitor.refused(code.name)  # ops: metrics hook
        context.abort(code, message)

    def _check_version(self, version: int, context: grpc.ServicerContext) -> None:
        if version != PROTOCOL_VERSION:
            self._refuse(
                context, grpc.StatusCode.FAILED_PRECONDITION,
                f"protocol version {version} is not supported: this server speaks skyfed protocol "
                f"version {PROTOCOL_VERSION}; install a matching skyfed on the client",
            )

    def _check_session(self, name: str, session_id: str, context: grpc.ServicerContext) -> None:
        expected = self.transport.session_of(name)
        if expected is None or not same_secret(session_id, expected):
            self._refuse(
                context, grpc.StatusCode.UNAUTHENTICATED,
                f"unknown session for client {name!r} (not registered, replaced or server restarted): register again",
            )
        self.monitor.seen(name)  # ops: metrics hook

    # ------------------------------------------------------------ RPCs

    def Register(self, request: pb.RegisterRequest, context: grpc.ServicerContext) -> pb.RegisterReply:
        self._check_version(request.protocol_version, context)
        name = request.name
        if name not in self.transport.clients:
            self._refuse(context, grpc.StatusCode.UNAUTHENTICATED, f"client {name!r} is not one of this experiment's clients")
        try:
            check_token(self.tokens, name, request.token)
        except AuthError as exc:
            self._refuse(context, grpc.StatusCode.UNAUTHENTICATED, str(exc))
        session = new_session_id()
        rec = self.transport.register(name, session, int(request.num_tokens))
        self.monitor.registered(name)  # ops: metrics hook
        log.info("client %s registered from %s (%d training tokens)", name, context.peer(), rec.num_tokens)
        return pb.RegisterReply(
            protocol_version=PROTOCOL_VERSION,
            session_id=session,
            client_index=rec.index,
            config_yaml=self.config_yaml,
            tokenizer_files=self.tokenizer_files,
            chunk_bytes=self.chunk_bytes,
        )

    def PullTask(self, request: pb.PullRequest, context: grpc.ServicerContext) -> Iterator[pb.TaskChunk]:
        self._check_version(request.protocol_version, context)
        self._check_session(request.name, request.session_id, context)
        wait = min(max(0.0, request.wait_s), MAX_PULL_WAIT_S)
        task = self.transport.next_task(request.name, wait)
        if task is False:
            yield pb.TaskChunk(header=pb.TaskHeader(status=pb.DONE, message="training is over"))
            return
        if task is None:
            yield pb.TaskChunk(header=pb.TaskHeader(status=pb.WAIT))
            return
        assert isinstance(task, TrainTask)
        yield pb.TaskChunk(header=pb.TaskHeader(
            status=pb.TASK, round=task.round, version=task.version, steps=task.steps,
            options_json=json.dumps(task.options), payload_bytes=len(task.payload),
        ))
        for view in iter_views(task.payload, self.chunk_bytes):
            yield encode_data_chunk(view)
        self.monitor.task_sent(request.name, task.round, len(task.payload))  # ops: metrics hook

    def PushUpdate(self, request_iterator: Iterator[bytes | pb.UpdateChunk], context: grpc.ServicerContext) -> pb.PushReply:
        first = next(request_iterator, None)
        kind, h = _parts(first) if first is not None else (None, None)
        if kind != "header":
            self._refuse(context, grpc.StatusCode.INVALID_ARGUMENT, "an update stream must start with its header")
        self._check_version(h.protocol_version, context)
        self._check_session(h.name, h.session_id, context)
        name, round = h.name, h.round
        meta = _meta(h.meta_json)
        stage = stage_of(meta=meta)  # "update", or a secure-aggregation control stage
        try:
            duplicate = self.transport.check_open(name, round, stage)
        except RoundClosedError as exc:
            self._refuse(context, grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        if duplicate:
            for _ in request_iterator:  # drain; nothing is kept
                pass
            log.info("duplicate update from %s for round %d ignored", name, round)
            return pb.PushReply(accepted=True, duplicate=True, message=f"round {round} update already received")
        result = ClientResult(
            client=name, round=round, base_version=h.base_version, payload=None, num_tokens=int(h.num_tokens),
            train_loss=h.train_loss, holdout_loss=h.holdout_loss if h.has_holdout_loss else None,
            compute_s=h.compute_s, error=h.error or None, meta=meta,
        )
        if result.error is None:
            what = f"update from {name} for round {round}"
            code = grpc.StatusCode.INVALID_ARGUMENT
            try:
                if h.payload_bytes > self.max_update_bytes:
                    raise PayloadTooLargeError(
                        f"{what}: {h.payload_bytes} bytes exceeds federation.max_update_bytes={self.max_update_bytes}"
                    )
                if h.payload_bytes <= 0:
                    raise WireFormatError(f"{what}: announced size {h.payload_bytes} is not positive")
                result.payload = self._receive(request_iterator, h.payload_bytes, what)
            except PayloadTooLargeError as exc:
                code, reason = grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc)
            except WireFormatError as exc:
                reason = str(exc) if str(exc).startswith(what) else f"{what}: {exc}"
            else:
                reason = None
            if reason is not None:
                self._record_refusal(result, reason)
                self._refuse(context, code, reason)
        try:
            accepted = self.transport.submit(result)
        except RoundClosedError as exc:
            self._refuse(context, grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        if not accepted:
            return pb.PushReply(accepted=True, duplicate=True, message=f"round {round} update already received")
        del result  # the engine owns the payload now (this thread holds no other reference)
        if not self.transport.wait_released(name, round, RELEASE_WAIT_S, stage):
            log.info("the round %d update of %s is still queued; answering its push", round, name)
        log.info("received the round %d update of %s (%d bytes)", round, name, h.payload_bytes)
        self.monitor.update_received(name, round, h.payload_bytes)  # ops: metrics hook
        return pb.PushReply(accepted=True, message=f"round {round} update received")

    def _receive(self, request_iterator: Iterator[bytes | pb.UpdateChunk], size: int, what: str) -> bytearray:
        """The update's bytes in one preallocated buffer, framing and CRC-32 checked."""
        buf = Assembler(size, what)
        for item in request_iterator:
            kind, data = _parts(item)
            if kind != "data":
                raise WireFormatError(f"{what}: a second header inside the stream")
            buf.add(data)
        payload = buf.finish()
        read_header(payload, self.max_update_bytes)  # framing, sizes, CRC-32
        return payload

    def _record_refusal(self, result: ClientResult, reason: str) -> None:
        """Tell the engine (the round must not wait for this client); drop the payload."""
        result.payload, result.error = None, f"refused by the server: {reason}"
        try:
            self.transport.submit(result)
        except RoundClosedError:
            pass


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


def _meta(text: str) -> dict:
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return {}
    return value if isinstance(value, dict) else {}

