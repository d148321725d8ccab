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
import sys
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from skyfed.config import ExperimentConfig
from skyfed.errors import ConfigError
from skyfed.federation.engine import EventSink
from skyfed.metrics import RunDir
from skyfed.runtime.assemble import assemble, finish
from skyfed.runtime.grpc import DEFAULT_CHUNK_BYTES
from skyfed.runtime.grpc.auth import require_tokens
from skyfed.runtime.grpc.client_config import client_config
from skyfed.runtime.grpc.limits import CallBounds, max_concurrent_rpcs, worker_threads
from skyfed.runtime.grpc.rawchunks import add_servicer
from skyfed.runtime.grpc.security import FLOW_WINDOW_BYTES, server_credentials, server_options
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
    flow_window_bytes: int = FLOW_WINDOW_BYTES  # per upload stream; 0: gRPC's automatic (BDP) window
    done_grace_s: float = 30.0  # how long to wait for every client to hear "training is over"
    metrics_port: int | None = None  # Prometheus /metrics + status page (runtime/grpc/monitor.py); 0 = any free port
    metrics_bind: str = "127.0.0.1"
    metrics_linger_s: float = 0.0  # keep serving metrics this long after a finished run
    open: bool = False  # run without tokens (explicitly); else tokens_file is required
    bounds: CallBounds = field(default_factory=CallBounds)  # call limits and deadlines


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
    if opts.flow_window_bytes < 0 or 0 < opts.flow_window_bytes < 65535 or opts.flow_window_bytes > 2**31 - 1:
        raise ConfigError(f"--flow-window-mib: the window must be 0 (automatic) or 64 KiB to 2 GiB, got {opts.flow_window_bytes} bytes")
    if opts.resume and opts.out is None:
        raise ConfigError("--resume needs --out: the run directory of the interrupted run")
    creds = server_credentials(opts.tls_cert, opts.tls_key, opts.client_ca, opts.insecure)
    tokens = require_tokens(opts.tokens_file, opts.open)
    spill_dir = cfg.federation.spill_dir
    if spill_dir is not None and not Path(spill_dir).is_dir():
        raise ConfigError(f"federation.spill_dir={spill_dir!r} is not a directory")
    if cfg.federation.round_timeout_s is None:
        log.warning("federation.round_timeout_s is not set: a round waits for a client that died until it comes back")
    names = [c.name for c in cfg.federation.clients]
    if tokens is not None:
        missing = [n for n in names if n not in tokens]
        if missing:
            raise ConfigError(f"tokens file {opts.tokens_file} has no token for client(s) {', '.join(missing)}")
    servers: list[grpc.Server] = []
    monitors: list = []
    servicers: list[FederationServicer] = []

    def serve(cfg: ExperimentConfig, data, device, emit: EventSink) -> GrpcTransport:
        """The transport, and the gRPC server that feeds it, listening before the model is built."""
        transport = GrpcTransport(names)
        # per-client configs (no server paths, no other client's data), call bounds, mutual TLS identity
        servicer = FederationServicer(
            transport, {n: client_config(cfg, n) for n in names}, tokenizer_files(data.tokenizer), tokens,
            cfg.federation.max_update_bytes, opts.chunk_bytes, bounds=opts.bounds, mutual_tls=opts.client_ca is not None,
        )
        servicers.append(servicer)
        workers = worker_threads(len(names), opts.bounds)  # a pool sized to the bounds
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers), options=server_options(opts.chunk_bytes, opts.flow_window_bytes),
                             maximum_concurrent_rpcs=max_concurrent_rpcs(workers))
        if opts.metrics_port is not None:
            from skyfed.runtime.grpc.monitor import ServerMonitor

            monitor = servicer.monitor = ServerMonitor(transport, cfg.federation.rounds)
            monitors.append(monitor)
            emit("metrics", {"address": opts.metrics_bind, "port": monitor.serve(opts.metrics_bind, opts.metrics_port)})
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
        for monitor in monitors:  # round-level gauges
            run.engine.observers.insert(0, monitor)
        servicers[0].limit_update_size(run.engine.core.spec, cfg.compression.uplink)  # no allocation beyond it
        if not cfg.security.secure_aggregation:  # (masked updates are the coordinator's, whole, in memory)
            transport.blob_check = run.engine.core.blob_check  # plain updates' values checked as they arrive
            if run.engine.core.streaming:  # large updates wait in a file, not in memory, until folded
                transport.spill_min_bytes, transport.spill_dir = cfg.federation.spill_min_bytes, cfg.federation.spill_dir
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
        for servicer in servicers:
            servicer.close()
        for monitor in monitors:  # linger only after a finished run
            monitor.close(opts.metrics_linger_s if sys.exc_info()[0] is None else 0.0)
