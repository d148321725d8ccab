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
from typing import Any

import torch

from skyfed.clouds import network_from_config
from skyfed.config import ExperimentConfig
from skyfed.errors import ConfigError
from skyfed.federation.engine import EventSink
from skyfed.metrics import RunDir
from skyfed.runtime.assemble import assemble, default_run_dir, finish
from skyfed.runtime.attack import apply_junk_data, wrap_with_attack
from skyfed.runtime.inprocess import SimulatedTransport
from skyfed.runtime.setup import PreparedData, make_client

log = logging.getLogger(__name__)


def simulated_transport(cfg: ExperimentConfig, data: PreparedData, device: torch.device, emit: EventSink) -> SimulatedTransport:
    """The clients, as objects here, on the simulated clouds (`clouds.simulate`)."""
    network = network_from_config(cfg, 0) if cfg.clouds.simulate else None
    apply_junk_data(cfg, data)  # [robust] attack: junk_data, before the clients are built (simulation only)

    def on_step(name: str, step: int, steps: int, loss: float) -> None:
        emit("local_step", {"client": name, "step": step, "steps": steps, "loss": loss})

    specs = cfg.federation.clients
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
    factory = simulated_transport
    extra: dict[str, Any] = {"runtime": cfg.runtime}
    if cfg.runtime == "ray":
        from skyfed.runtime.ray import ray_transport

        if cfg.attack.active:
            raise ConfigError("attack: the simulated attacks run with runtime: inprocess, not under runtime: ray")

        out = out if out is not None else default_run_dir(cfg)
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
