"""Run a whole federated experiment on one machine: the clients are objects in this
process, or in `workers` worker processes (skyfed.runtime.workers).

    skyfed run                       # the default three-cloud experiment
    skyfed run --preset smoke        # seconds
    skyfed run --out runs/x --resume # continue a stopped run exactly where it left off
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from skyfed.clouds import network_from_config
from skyfed.config import ExperimentConfig
from skyfed.federation.engine import EventSink
from skyfed.metrics import RunDir
from skyfed.runtime.assemble import assemble, finish
from skyfed.runtime.attack import apply_junk_data, wrap_with_attack  # [robust]
from skyfed.runtime.inprocess import ParallelTransport, SimulatedTransport
from skyfed.runtime.setup import PreparedData, make_client

log = logging.getLogger(__name__)


def simulated_transport(cfg: ExperimentConfig, data: PreparedData, device: torch.device, emit: EventSink) -> SimulatedTransport:
    """The clients, as objects here (`workers` 1) or in worker processes, on the
    simulated clouds (`clouds.simulate`)."""
    network = network_from_config(cfg, 0) if cfg.clouds.simulate else None
    apply_junk_data(cfg, data)  # [robust] attack: junk_data, before the clients are built (simulation only)

    def on_step(name: str, step: int, steps: int, loss: float) -> None:
        emit("local_step", {"client": name, "step": step, "steps": steps, "loss": loss})

    specs = cfg.federation.clients
    if cfg.workers > 1:
        from skyfed.runtime.workers import ClientInit, WorkerPool

        inits = [ClientInit(s.name, i, data.client_tokens[s.name]) for i, s in enumerate(specs)]
        emit("status", {"message": f"starting {min(cfg.workers, len(specs))} client worker processes"})
        pool = WorkerPool(cfg, inits, data.tokenizer, cfg.workers)
        # [robust] attack: update-level attacks wrap the transport (simulation only)
        return wrap_with_attack(cfg, ParallelTransport(pool, [s.name for s in specs], network, on_step), data.tokenizer)
    clients = []
    for i, spec in enumerate(specs):
        client = make_client(cfg, spec.name, i, data.client_tokens[spec.name], data.tokenizer, device)
        client.on_step = on_step
        clients.append(client)
    return wrap_with_attack(cfg, SimulatedTransport(clients, network), data.tokenizer)  # [robust] attack


def run_simulation(
    cfg: ExperimentConfig, out: str | Path | None = None, on_event: EventSink | None = None, resume: bool = False
) -> tuple[RunDir, dict[str, Any]]:
    """Train, evaluate and save; returns the run directory and its summary."""
    run = assemble(cfg, simulated_transport, out, on_event, resume=resume)
    try:
        run.engine.run()
    finally:
        run.transport.close()
    client_tokens = {name: len(run.data.client_tokens[name]) for name in run.transport.client_names()}
    summary = finish(run, {"runtime": "inprocess", "client_tokens": client_tokens, "workers": cfg.workers})
    return run.run_dir, summary
