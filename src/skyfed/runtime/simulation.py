"""Run a whole federated experiment with simulated clouds: the clients are objects in
this process (`runtime: inprocess`) or trained by a pool of Ray actors (`runtime: ray`,
skyfed.runtime.ray), on this machine or a Ray cluster.

    skyfed run                       # the default three-cloud experiment
    skyfed run --preset smoke        # seconds
    skyfed run --out runs/x --resume # continue a stopped run exactly where it left off
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable

import torch

from skyfed.clouds import network_from_config
from skyfed.config import ExperimentConfig
from skyfed.errors import ConfigError
from skyfed.federation.engine import EventSink
from skyfed.metrics import RunDir
from skyfed.runtime.assemble import assemble, default_run_dir, finish
from skyfed.runtime.attack import apply_junk_data, wrap_with_attack
from skyfed.lora_ranks import client_rank
from skyfed.runtime.client_state import ClientStateFiles
from skyfed.runtime.inprocess import SimulatedTransport
from skyfed.runtime.replica import ClientReplica, ReplicaClient
from skyfed.runtime.setup import PreparedData, make_client

log = logging.getLogger(__name__)


def state_on_disk(cfg: ExperimentConfig) -> bool:
    """Whether the simulated clients keep their state in files and share one model replica
    (`simulation.client_state: disk`). Document-level DP-SGD keeps each client's privacy
    ledger and noise in its trainer, so its clients stay resident."""
    if cfg.simulation.client_state != "disk":
        return False
    if cfg.security.dp.document is not None:
        log.warning("simulation.client_state: disk does not apply with security.dp.document: the clients stay in memory")
        return False
    return True


def simulated_transport(
    cfg: ExperimentConfig, data: PreparedData, device: torch.device, emit: EventSink, run_dir: Path | None = None
) -> SimulatedTransport:
    """The clients, as objects here, on the simulated clouds (`clouds.simulate`): resident
    clients, or (`simulation.client_state: disk`, which needs `run_dir`) clients whose state
    is in RUN_DIR/clients and who share one model replica (one per LoRA rank, with
    per-client ranks)."""
    network = network_from_config(cfg, 0) if cfg.clouds.simulate else None
    apply_junk_data(cfg, data)  # [robust] attack: junk_data, before the clients are built (simulation only)

    def on_step(name: str, step: int, steps: int, loss: float) -> None:
        emit("local_step", {"client": name, "step": step, "steps": steps, "loss": loss})

    specs = cfg.federation.clients
    clients: list = []
    files = None
    if run_dir is not None and state_on_disk(cfg):
        files = ClientStateFiles(Path(run_dir) / "clients")
        replicas: dict[int | None, ClientReplica] = {}  # one per LoRA rank the clients train (HetLoRA)
        for i, spec in enumerate(specs):
            rank = client_rank(cfg, spec.name)
            if rank not in replicas:
                initial = files.root / ("initial.safetensors" if rank is None else f"initial-r{rank}.safetensors")
                replicas[rank] = ClientReplica(cfg, data.tokenizer, threads=None, initial_path=initial, like=spec.name)
            replica = replicas[rank]
            secagg = None
            if cfg.security.secure_aggregation:
                from skyfed.security.secagg.participant import SecAggParticipant

                secagg = SecAggParticipant.for_config(spec.name, replica.client.spec, cfg)
            client = ReplicaClient(spec.name, i, data.client_tokens[spec.name], replica, files, secagg)
            client.on_step = on_step
            clients.append(client)
    else:
        for i, spec in enumerate(specs):
            client = make_client(cfg, spec.name, i, data.client_tokens[spec.name], data.tokenizer, device)
            client.on_step = on_step
            clients.append(client)
    # the attacks rewrite results while they wait, so those keep their payloads in memory
    link = SimulatedTransport(clients, network, files=files, spill_updates=not cfg.attack.active)
    return wrap_with_attack(cfg, link, data.tokenizer)  # [robust] attack


def simulated_transports(run_dir: Path) -> Callable[[ExperimentConfig, PreparedData, torch.device, EventSink], SimulatedTransport]:
    """The transport factory `assemble` calls for `runtime: inprocess`, keeping client
    state files under `run_dir`."""
    return lambda cfg, data, device, emit: simulated_transport(cfg, data, device, emit, run_dir)


def run_simulation(
    cfg: ExperimentConfig, out: str | Path | None = None, on_event: EventSink | None = None, resume: bool = False
) -> tuple[RunDir, dict[str, Any]]:
    """Train, evaluate and save; returns the run directory and its summary."""
    out = out if out is not None else default_run_dir(cfg)
    factory = simulated_transports(Path(out))
    extra: dict[str, Any] = {"runtime": cfg.runtime}
    if cfg.runtime == "ray":
        from skyfed.runtime.ray import ray_transport

        if cfg.attack.active:
            raise ConfigError("attack: the simulated attacks run with runtime: inprocess, not under runtime: ray")

        factory = ray_transport(Path(out))
        extra["ray_actors"] = cfg.ray.actors
    run = assemble(cfg, factory, out, on_event, resume=resume)
    try:
        run.engine.run()
    finally:
        run.transport.close()
    client_tokens = {name: len(run.data.client_tokens[name]) for name in run.transport.client_names()}
    summary = finish(run, {**extra, "client_tokens": client_tokens})
    return run.run_dir, summary
