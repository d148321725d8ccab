"""`skyfed server`: the aggregation server of a real deployment.

    skyfed server exp.yaml --listen 0.0.0.0:7443 --tls-cert server.pem --tls-key server.key \
        --tokens tokens.yaml --out runs/exp
    skyfed server exp.yaml --listen 0.0.0.0:7443 ... --out runs/exp --resume   # after a crash

Prepares the tokenizer and the validation split (as a simulation does), serves the
`skyfed.v1.Federation` service, waits for the configured clients (or a quorum of
`federation.min_clients` after `join_timeout_s`), runs the unchanged `Engine` through a
`GrpcTransport`, then writes the same run directory as a simulation.
"""

from __future__ import annotations

import logging
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from skyfed.config import ExperimentConfig, dump_config
from skyfed.errors import ConfigError
from skyfed.federation.engine import EventSink
from skyfed.metrics import RunDir
from skyfed.runtime.assemble import assemble, finish
from skyfed.runtime.grpc import DEFAULT_CHUNK_BYTES
from skyfed.runtime.grpc.auth import load_tokens
from skyfed.runtime.grpc.rawchunks import add_servicer
from skyfed.runtime.grpc.security import server_credentials, server_options
from skyfed.runtime.grpc.servicer import FederationServicer
from skyfed.runtime.grpc.transport import GrpcTransport

log = logging.getLogger(__name__)


@dataclass
class ServerOptions:
    listen: str
    tls_cert: Path | None = None
    tls_key: Path | None = None
    client_ca: Path | None = None
    tokens_file: Path | None = None
    insecure: bool = False
    out: Path | None = None
    resume: bool = False
    join_timeout_s: float = 300.0
    chunk_bytes: int = DEFAULT_CHUNK_BYTES
    done_grace_s: float = 30.0  # how long to wait for every client to hear "training is over"


def tokenizer_files(tokenizer) -> dict[str, bytes]:
    """The tokenizer directory's files, to hand to every client."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        return {p.name: p.read_bytes() for p in Path(tmp).iterdir() if p.is_file()}


def run_server(cfg: ExperimentConfig, opts: ServerOptions, on_event: EventSink | None = None) -> tuple[RunDir, dict[str, Any]]:
    """Serve until the last round is done; return the run directory and its summary."""
    emit = on_event or (lambda kind, data: None)
    if opts.chunk_bytes < 1024:
        raise ConfigError(f"chunk size must be at least 1 KiB, got {opts.chunk_bytes} bytes")
    if opts.resume and opts.out is None:
        raise ConfigError("--resume needs --out: the run directory of the interrupted run")
    creds = server_credentials(opts.tls_cert, opts.tls_key, opts.client_ca, opts.insecure)
    tokens = load_tokens(opts.tokens_file) if opts.tokens_file else None
    if tokens is None:
        log.warning("no --tokens file: any client that knows a configured name can join")
    if cfg.federation.round_timeout_s is None:
        log.warning("federation.round_timeout_s is not set: a round waits for a client that died until it comes back")
    names = [c.name for c in cfg.federation.clients]
    if tokens is not None:
        missing = [n for n in names if n not in tokens]
        if missing:
            raise ConfigError(f"tokens file {opts.tokens_file} has no token for client(s) {', '.join(missing)}")
    servers: list[grpc.Server] = []

    def serve(cfg: ExperimentConfig, data, device, emit: EventSink) -> GrpcTransport:
        """The transport, and the gRPC server that feeds it, listening before the model is built."""
        transport = GrpcTransport(names)
        servicer = FederationServicer(
            transport, dump_config(cfg), tokenizer_files(data.tokenizer), tokens, cfg.federation.max_update_bytes,
            opts.chunk_bytes,
        )
        server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=max(8, 2 * len(names) + 4)), options=server_options(opts.chunk_bytes)
        )
        add_servicer(servicer, server)
        try:
            port = server.add_secure_port(opts.listen, creds) if creds is not None else server.add_insecure_port(opts.listen)
        except RuntimeError as exc:
            raise ConfigError(f"--listen {opts.listen}: cannot bind ({exc})") from None
        if port == 0:
            raise ConfigError(f"--listen {opts.listen}: cannot bind (address in use or invalid)")
        server.start()
        servers.append(server)
        log.info("listening on %s (%s)", opts.listen, "PLAINTEXT" if creds is None else "TLS")
        emit("listening", {"address": opts.listen, "port": port, "tls": creds is not None})
        return transport

    try:
        run = assemble(cfg, serve, opts.out, emit, resume=opts.resume, server_side=True)
        transport: GrpcTransport = run.transport  # type: ignore[assignment]
        log.info("waiting for clients %s", names)
        ready = transport.wait_for_clients(cfg.federation.min_clients, opts.join_timeout_s)
        log.info("clients ready: %s; starting at round %d", ready, run.engine.next_round)
        run.engine.run()
        transport.close()
        client_tokens = {n: r["num_tokens"] for n, r in transport.registry_state().items()}
        summary = finish(run, {
            "runtime": "grpc",
            "client_tokens": client_tokens,
            "tls": creds is not None,
            "mutual_tls": opts.client_ca is not None,
        })
        pending = transport.wait_told_done(opts.done_grace_s)
        if pending:
            log.warning("clients %s did not hear that training is over", pending)
        return run.run_dir, summary
    finally:
        for server in servers:
            server.stop(grace=2).wait()
