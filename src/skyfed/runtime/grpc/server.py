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
import time
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import torch

from skyfed.config import ExperimentConfig, dump_config
from skyfed.errors import ConfigError
from skyfed.federation.engine import Engine, EventSink
from skyfed.federation.strategies import build_strategy
from skyfed.metrics import RunDir
from skyfed.model import federated_parameter_names, num_parameters
from skyfed.runtime.finish import build_summary, save_hf_model
from skyfed.runtime.grpc import DEFAULT_CHUNK_BYTES
from skyfed.runtime.grpc.rawchunks import add_servicer
from skyfed.runtime.grpc.auth import load_tokens
from skyfed.runtime.grpc.security import server_credentials, server_options
from skyfed.runtime.grpc.servicer import FederationServicer
from skyfed.runtime.grpc.transport import GrpcTransport
from skyfed.security.privacy import apply_privacy, privacy_summary  # skyfed.security hook
from skyfed.runtime.setup import apply_threads, device_for, make_evaluator, new_model, prepare_data
from skyfed.runtime.simulation import default_run_dir

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


class ServerEngine(Engine):
    """The engine plus the client registry in every checkpoint."""

    def state(self) -> dict[str, Any]:
        state = super().state()
        state["clients"] = self.transport.registry_state()  # type: ignore[attr-defined]
        return state

    def resume(self) -> None:
        super().resume()
        state = torch.load(self.checkpoint_dir / "state.pt", weights_only=False)
        self.transport.load_registry_state(state.get("clients", {}))  # type: ignore[attr-defined]


def tokenizer_files(tokenizer) -> dict[str, bytes]:
    """The tokenizer directory's files, to hand to every client."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        return {p.name: p.read_bytes() for p in Path(tmp).iterdir() if p.is_file()}


def _server_side_config(cfg: ExperimentConfig) -> ExperimentConfig:
    """The server never reads clients' local data paths (they live on the clients)."""
    clients = [spec.model_copy(update={"data": None}) for spec in cfg.federation.clients]
    return cfg.model_copy(update={"federation": cfg.federation.model_copy(update={"clients": clients})})


def run_server(cfg: ExperimentConfig, opts: ServerOptions, on_event: EventSink | None = None) -> tuple[RunDir, dict[str, Any]]:
    """Serve until the last round is done; return the run directory and its summary."""
    started = time.perf_counter()
    emit = on_event or (lambda kind, data: None)
    if opts.resume and opts.out is None:
        raise ConfigError("--resume needs --out: the run directory of the interrupted run")
    resume = opts.resume
    if resume and not (Path(opts.out) / "checkpoint" / "state.pt").exists():
        if not Path(opts.out).is_dir():
            raise ConfigError(f"--resume: run directory {opts.out} does not exist")
        log.warning("--resume: no checkpoint in %s yet (crashed in round 0?): starting from round 0", opts.out)
        RunDir(opts.out).truncate_metrics(-1)
        resume = False
    if opts.chunk_bytes < 1024:
        raise ConfigError(f"chunk size must be at least 1 KiB, got {opts.chunk_bytes} bytes")
    creds = server_credentials(opts.tls_cert, opts.tls_key, opts.client_ca, opts.insecure)
    tokens = load_tokens(opts.tokens_file) if opts.tokens_file else None
    if tokens is None:
        log.warning("no --tokens file: any client that knows a configured name can join")
    if cfg.federation.round_timeout_s is None:
        log.warning("federation.round_timeout_s is not set: a round waits for a client that died until it comes back")
    apply_threads(cfg)
    device = device_for(cfg)
    run = RunDir(opts.out or default_run_dir(cfg))
    run.write_config(dump_config(cfg))
    data = prepare_data(_server_side_config(cfg))
    names = [c.name for c in cfg.federation.clients]
    if tokens is not None:
        missing = [n for n in names if n not in tokens]
        if missing:
            raise ConfigError(f"tokens file {opts.tokens_file} has no token for client(s) {', '.join(missing)}")
    transport = GrpcTransport(names)
    servicer = FederationServicer(
        transport, dump_config(cfg), tokenizer_files(data.tokenizer), tokens, cfg.federation.max_update_bytes, opts.chunk_bytes
    )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=max(8, 2 * len(names) + 4)), options=server_options(opts.chunk_bytes))
    add_servicer(servicer, server)
    try:
        port = server.add_secure_port(opts.listen, creds) if creds is not None else server.add_insecure_port(opts.listen)
    except RuntimeError as exc:
        raise ConfigError(f"--listen {opts.listen}: cannot bind ({exc})") from None
    if port == 0:
        raise ConfigError(f"--listen {opts.listen}: cannot bind (address in use or invalid)")
    server.start()
    log.info("listening on %s (%s)", opts.listen, "PLAINTEXT" if creds is None else "TLS")
    emit("listening", {"address": opts.listen, "port": port, "tls": creds is not None})
    try:
        model = new_model(cfg, data.tokenizer).to(device)
        evaluator = make_evaluator(cfg, data.valid.tokens, device)
        strategy = build_strategy(cfg.federation.strategy.name, cfg.federation.strategy.params)
        privacy: list = []  # skyfed.security hook: DP wrapper and the epsilon accountant
        strategy = apply_privacy(cfg, strategy, privacy)
        engine = ServerEngine(cfg, transport, model, federated_parameter_names(model), strategy, evaluator, run, emit)
        engine.observers.extend(privacy)  # skyfed.security hook
        if resume:
            engine.resume()
            for obs in privacy:  # skyfed.security hook: the privacy ledgers continue
                obs.resume_from((run.read_metrics() or [{}])[-1])
        log.info("waiting for clients %s", names)
        ready = transport.wait_for_clients(cfg.federation.min_clients, opts.join_timeout_s)
        log.info("clients ready: %s; starting at round %d", ready, engine.next_round)
        emit("start", {"rounds": cfg.federation.rounds, "clients": names, "params": num_parameters(model), "run_dir": str(run.path)})
        engine.run()
        transport.close()
        final = evaluator(model, cfg.eval.final_max_batches)
        save_hf_model(model, data.tokenizer, run)
        client_tokens = {n: r["num_tokens"] for n, r in transport.registry_state().items()}
        summary = build_summary(run, final, data.unigram_ppl, time.perf_counter() - started, {
            "mode": "federated",
            "runtime": "grpc",
            "strategy": cfg.federation.strategy.name,
            "params": num_parameters(model),
            "client_tokens": client_tokens,
            "device": str(device),
            "tls": creds is not None,
            "mutual_tls": opts.client_ca is not None,
            **privacy_summary(privacy),  # skyfed.security hook: epsilon
        })
        run.write_summary(summary)
        pending = transport.wait_told_done(opts.done_grace_s)
        if pending:
            log.warning("clients %s did not hear that training is over", pending)
        return run, summary
    finally:
        transport.close()
        server.stop(grace=2).wait()
