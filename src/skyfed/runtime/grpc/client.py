"""`skyfed client`: one cloud's side of a real deployment.

    skyfed client --server fl.example.org:7443 --name aws --data /data/corpus \
        --ca-cert ca.pem --token-file aws.token

Registers with the server, receives the experiment config and the tokenizer (so every
client uses the same tokenizer and model), tokenizes its own local data (any format
`data.corpus.read_documents` reads; without `--data`, the same partition of the
configured corpus that a simulation client of this name would get), then pulls tasks,
trains them with the same `FederatedClient` as the simulation, and pushes the updates.
It reconnects with capped exponential backoff and carries on (the `FederatedClient`,
with its optimizer state, persists across reconnects) and exits 0 when the server
says training is over.

With `security.secure_aggregation` in the config the server sends, the client holds a
`SecAggParticipant`: it answers the server's control tasks (keys, shares, unmask)
without training and pushes each answer like an update, and pushes its masked ring
vector instead of a codec-encoded update (docs/security.md).
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import grpc
import numpy as np
from google.protobuf.message import DecodeError
import yaml
from pydantic import ValidationError

from skyfed.config import ExperimentConfig, refuse_attack
from skyfed.compression import strictjson
from skyfed.errors import AuthError, ConfigError, DataError, SkyfedError, WireFormatError
from skyfed.federation.messages import ClientResult, TrainTask
from skyfed.runtime.grpc import DEFAULT_CHUNK_BYTES, PROTOCOL_VERSION
from skyfed.runtime.grpc import skyfed_pb2 as pb
from skyfed.runtime.grpc import skyfed_pb2_grpc as pb_grpc
from skyfed.runtime.grpc.auth import call_metadata
from skyfed.runtime.grpc.chunks import Assembler, iter_views
from skyfed.runtime.grpc.client_config import PRIVATE_CORPUS
from skyfed.runtime.grpc.rawchunks import data_of, encode_data_chunk, pull_call, push_call
from skyfed.runtime.grpc.security import channel_credentials, channel_options

log = logging.getLogger(__name__)

T = TypeVar("T")
TRANSIENT = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.ABORTED}


@dataclass
class ClientOptions:
    server: str
    name: str
    token: str = ""
    data: Path | None = None
    ca_cert: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    insecure: bool = False
    connect_timeout_s: float = 60.0  # first contact: give up (exit 2) after this long
    give_up_s: float = 600.0  # later: give up after the server is unreachable this long
    initial_backoff_s: float = 0.5
    max_backoff_s: float = 30.0
    pull_wait_s: float = 30.0
    protocol_version: int = PROTOCOL_VERSION


@dataclass
class Pulled:
    status: str  # "task" | "wait" | "done"
    task: TrainTask | None = None


def _task_chunk(raw: bytes) -> pb.TaskChunk:
    """A TaskChunk from the server; WireFormatError if the bytes are not one."""
    try:
        return pb.TaskChunk.FromString(raw)
    except DecodeError as exc:
        raise WireFormatError(f"malformed task chunk from the server: {exc}") from None


def _fail_message(err: grpc.RpcError) -> str:
    return f"{err.code().name}: {err.details()}"


def _transient(err: grpc.RpcError) -> bool:
    """Worth retrying: the server is unreachable or busy (its concurrent-call limits)."""
    if err.code() in TRANSIENT:
        return True
    return err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "concurrent" in (err.details() or "").lower()


class FederationSession:
    """A client's connection: register, pull, push; reconnects and re-registers as needed."""

    def __init__(self, opts: ClientOptions, chunk_bytes: int = DEFAULT_CHUNK_BYTES):
        self.opts = opts
        creds = channel_credentials(opts.ca_cert, opts.tls_cert, opts.tls_key, opts.insecure)
        options = channel_options(chunk_bytes)
        self.channel = (
            grpc.secure_channel(opts.server, creds, options=options) if creds is not None
            else grpc.insecure_channel(opts.server, options=options)
        )
        self.stub = pb_grpc.FederationStub(self.channel)
        self._pull = pull_call(self.channel)  # data chunks as raw bytes (see rawchunks.py)
        self._push = push_call(self.channel)
        self.session_id = ""
        self.chunk_bytes = chunk_bytes
        self.num_tokens = 0
        self.connected_once = False

    def close(self) -> None:
        self.channel.close()

    # ------------------------------------------------------------ retries

    def _retrying(self, what: str, call: Callable[[], T]) -> T:
        """Run `call`; on a transient failure wait (capped exponential backoff) and retry;
        on an expired session register again and retry."""
        failing_since: float | None = None
        attempt = 0
        while True:
            try:
                out = call()
                self.connected_once = True
                return out
            except grpc.RpcError as err:
                code = err.code()
                if code == grpc.StatusCode.UNAUTHENTICATED and self.session_id and "session" in (err.details() or ""):
                    log.warning("%s: %s; registering again", what, err.details())
                    self.session_id = ""
                    self.register(self.num_tokens)
                    continue
                if not _transient(err):
                    raise
                now = time.monotonic()
                failing_since = failing_since or now
                limit = self.opts.give_up_s if self.connected_once else self.opts.connect_timeout_s
                if now - failing_since >= limit:
                    hint = "" if self.connected_once else (
                        "; check the address and the firewall, and that TLS settings match the server's "
                        "(--ca-cert for a TLS server, --insecure only for a plaintext one)"
                    )
                    raise SkyfedError(
                        f"cannot reach the skyfed server at {self.opts.server} for {limit:.0f}s "
                        f"({_fail_message(err)}){hint}"
                    ) from None
                delay = min(self.opts.max_backoff_s, self.opts.initial_backoff_s * 2**attempt)
                delay *= random.uniform(0.5, 1.0)
                attempt += 1
                log.warning("%s: server unavailable (%s); retrying in %.1fs", what, err.details(), delay)
                time.sleep(delay)

    # ------------------------------------------------------------ RPCs

    def _metadata(self, register: bool = False) -> list[tuple[str, str]]:
        if register:
            return call_metadata(self.opts.protocol_version, self.opts.name, token=self.opts.token)
        return call_metadata(self.opts.protocol_version, self.opts.name, session=self.session_id)

    def register(self, num_tokens: int = 0) -> pb.RegisterReply:
        self.num_tokens = num_tokens
        req = pb.RegisterRequest(protocol_version=self.opts.protocol_version, name=self.opts.name, num_tokens=num_tokens)
        try:
            reply = self._retrying("register", lambda: self.stub.Register(req, timeout=60, metadata=self._metadata(True)))
        except grpc.RpcError as err:
            if err.code() == grpc.StatusCode.UNAUTHENTICATED:
                raise AuthError(f"the server refused client {self.opts.name!r}: {_fail_message(err)}") from None
            raise SkyfedError(f"the server refused registration: {_fail_message(err)}") from None
        self.session_id = reply.session_id
        self.chunk_bytes = int(reply.chunk_bytes) or self.chunk_bytes
        log.info("registered with %s as %s", self.opts.server, self.opts.name)
        return reply

    def pull(self, max_bytes: int | None = None) -> Pulled:
        def call() -> Pulled:
            req = pb.PullRequest(protocol_version=self.opts.protocol_version, name=self.opts.name,
                                 session_id=self.session_id, wait_s=self.opts.pull_wait_s)
            stream = self._pull(req, metadata=self._metadata())
            h = _task_chunk(next(stream)).header
            if h.status == pb.DONE:
                return Pulled("done")
            if h.status != pb.TASK:
                return Pulled("wait")
            if max_bytes is not None and h.payload_bytes > max_bytes:
                raise SkyfedError(f"the server's model of {h.payload_bytes} bytes exceeds federation.max_update_bytes={max_bytes}")
            buf = Assembler(h.payload_bytes, f"global model of round {h.round}")
            for raw in stream:
                data = data_of(raw)
                buf.add(data if data is not None else _task_chunk(raw).data)
            options = strictjson.loads((h.options_json or "{}").encode(), f"task options of round {h.round}")
            if not isinstance(options, dict):
                raise WireFormatError(f"task options of round {h.round}: not a JSON object")
            task = TrainTask(h.round, h.version, buf.finish(), h.steps, options)
            return Pulled("task", task)

        return self._retrying("pull task", call)

    def push_raw(self, header: pb.UpdateHeader, payload: bytes | bytearray | memoryview) -> pb.PushReply:
        """One attempt to stream an update (header, then chunks); raises grpc.RpcError."""
        header.protocol_version = self.opts.protocol_version
        header.name = self.opts.name
        header.session_id = self.session_id

        def messages() -> Iterator[pb.UpdateChunk | bytes]:
            yield pb.UpdateChunk(header=header)
            for view in iter_views(payload, self.chunk_bytes):
                yield encode_data_chunk(view)

        return self._push(messages(), metadata=self._metadata())

    def push(self, result: ClientResult) -> bool:
        """Send a result (retrying transient failures); False if the server refused or rejected it."""
        payload = result.payload or b""
        header = pb.UpdateHeader(
            round=result.round, base_version=result.base_version, num_tokens=result.num_tokens,
            train_loss=result.train_loss, holdout_loss=result.holdout_loss or 0.0,
            has_holdout_loss=result.holdout_loss is not None, compute_s=result.compute_s,
            error=result.error or "", payload_bytes=len(payload), meta_json=json.dumps(result.meta),
        )
        try:
            reply = self._retrying(f"push round {result.round}", lambda: self.push_raw(header, payload))
        except grpc.RpcError as err:
            if err.code() == grpc.StatusCode.ALREADY_EXISTS:  # a retry after a lost reply
                log.warning("round %d: the server already has this round's update (%s)", result.round, err.details())
                return True
            log.error("the server refused the round %d update: %s", result.round, _fail_message(err))
            return False
        if not reply.accepted:
            log.error("round %d: the server rejected the update: %s", result.round, reply.message)
            return False
        log.info("round %d: %s", result.round, reply.message)
        return True


# ---------------------------------------------------------------- the client loop


def _config_from(reply: pb.RegisterReply) -> ExperimentConfig:
    try:
        cfg = ExperimentConfig.model_validate(yaml.safe_load(reply.config_yaml))
    except (yaml.YAMLError, ValidationError) as exc:
        raise ConfigError(f"the server sent a config this client cannot read (version mismatch?): {exc}") from None
    refuse_attack(cfg, "skyfed client")  # attacks are for simulation only
    return cfg


def _save_tokenizer(files: dict[str, bytes], cache: Path) -> Path:
    """Write the server's tokenizer files into a content-addressed cache folder."""
    h = hashlib.sha256()
    for name in sorted(files):
        if "/" in name or name.startswith("."):
            raise SkyfedError(f"the server sent a tokenizer file with an unsafe name: {name!r}")
        h.update(name.encode() + b"\0" + files[name])
    folder = cache / "server-tokenizers" / h.hexdigest()[:16]
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        if not (folder / name).exists():
            (folder / name).write_bytes(data)
    return folder


def _local_tokens(cfg: ExperimentConfig, name: str, data: Path | None, tokenizer, tok_key: str) -> np.ndarray:
    from skyfed.data.corpus import read_documents
    from skyfed.data.shards import tokenize_documents
    from skyfed.runtime.setup import cache_dir, prepare_data

    spec = next(c for c in cfg.federation.clients if c.name == name)
    path = data if data is not None else spec.data
    if path is None:  # the same partition a simulation client of this name trains on
        if cfg.data.path == PRIVATE_CORPUS:
            raise ConfigError(
                f"client {name!r} has no data: the server's corpus is a path on the server; pass --data PATH"
            )
        return prepare_data(cfg).client_tokens[name]
    shard = tokenize_documents(read_documents(path, cfg.data.format, cfg.data.text_column), tokenizer, tok_key, cache_dir())
    need = cfg.train.seq_len + 2
    if shard.num_tokens < need:
        raise DataError(f"{path}: {shard.num_tokens} training tokens, need at least {need} for one window")
    return shard.tokens


def run_client(opts: ClientOptions, on_event: Callable[[str, dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Join, train every task the server sends, return when training is over."""
    from skyfed.data.tokenizer import get_tokenizer
    from skyfed.runtime.setup import apply_threads, cache_dir, device_for, make_client
    from skyfed.security.secagg.participant import SecAggParticipant

    emit = on_event or (lambda kind, data: None)
    session = FederationSession(opts)
    try:
        reply = session.register(0)
        cfg = _config_from(reply)
        cfg.tokenizer.path = str(_save_tokenizer(dict(reply.tokenizer_files), cache_dir()))
        apply_threads(cfg)
        device = device_for(cfg)
        tokenizer, tok_key = get_tokenizer([], 0, 1, cache_dir(), cfg.tokenizer.path)
        tokens = _local_tokens(cfg, opts.name, opts.data, tokenizer, tok_key)
        client = make_client(cfg, opts.name, reply.client_index, tokens, tokenizer, device)
        client.secagg = SecAggParticipant.for_config(opts.name, client.spec, cfg)  # None unless secure aggregation
        session.register(client.num_tokens)
        emit("joined", {"client": opts.name, "tokens": client.num_tokens, "rounds": cfg.federation.rounds})
        trained: list[int] = []
        while True:
            pulled = session.pull(cfg.federation.max_update_bytes)
            if pulled.status == "done":
                break
            if pulled.status == "wait" or pulled.task is None:
                continue
            task = pulled.task
            if client.secagg is not None and client.secagg.is_control(task):  # secure aggregation: no training
                session.push(client.handle(task))
                continue
            emit("round_start", {"client": opts.name, "round": task.round})
            result = client.handle(task)
            if session.push(result):
                trained.append(task.round)
            emit("round_end", {"client": opts.name, "round": task.round, "train_loss": result.train_loss})
        log.info("training is over; trained rounds %s", trained)
        return {"client": opts.name, "rounds_trained": trained}
    except grpc.RpcError as err:
        raise SkyfedError(f"the server ended the session of client {opts.name!r}: {_fail_message(err)}") from None
    finally:
        session.close()
