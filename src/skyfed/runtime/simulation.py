"""Run a whole federated experiment on one machine: the clients are objects in this
process, or in `workers` worker processes (skyfed.runtime.workers).

    skyfed run                       # the default three-cloud experiment
    skyfed run --preset smoke        # seconds
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from skyfed.config import ExperimentConfig, dump_config
from skyfed.federation.engine import Engine, EventSink
from skyfed.federation.strategies import build_strategy, needs_server_eval
from skyfed.metrics import RunDir
from skyfed.model import federated_parameter_names, num_parameters
from skyfed.runtime.finish import build_summary, save_hf_model
from skyfed.clouds import network_from_config
from skyfed.runtime.cloud_metrics import CloudAccounting
from skyfed.runtime.inprocess import ParallelTransport, SimulatedTransport
from skyfed.security.privacy import apply_privacy, privacy_summary  # skyfed.security hook
from skyfed.runtime.setup import apply_threads, device_for, make_client, make_evaluator, new_model, prepare_data

log = logging.getLogger(__name__)


def default_run_dir(cfg: ExperimentConfig, label: str = "") -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path(cfg.out_dir) / f"{cfg.name}{label}-{stamp}"


def run_simulation(
    cfg: ExperimentConfig, out: str | Path | None = None, on_event: EventSink | None = None
) -> tuple[RunDir, dict[str, Any]]:
    """Train, evaluate and save; returns the run directory and its summary."""
    started = time.perf_counter()
    emit = on_event or (lambda kind, data: None)
    apply_threads(cfg)
    device = device_for(cfg)
    strat = cfg.federation.strategy  # validate the strategy's params before any work
    strategy = build_strategy(strat.name, strat.params, evaluate_params=lambda params: 0.0)
    network = network_from_config(cfg, 0) if cfg.clouds.simulate else None  # config errors before any work
    run = RunDir(out or default_run_dir(cfg))
    run.write_config(dump_config(cfg))
    emit("status", {"message": "preparing data and tokenizer"})
    data = prepare_data(cfg)
    if data.partition is not None:
        run.write_json("partition.json", data.partition.stats)
    transport = make_transport(cfg, data, device, network, emit)
    try:
        return _train(cfg, run, data, device, strategy, network, transport, emit, started)
    finally:
        transport.close()


def make_transport(cfg: ExperimentConfig, data, device, network, emit: EventSink) -> SimulatedTransport:
    """The clients, as objects here (`workers` 1) or in worker processes."""
    def on_step(name: str, step: int, steps: int, loss: float) -> None:
        emit("local_step", {"client": name, "step": step, "steps": steps, "loss": loss})

    specs = cfg.federation.clients
    if cfg.workers > 1:
        from skyfed.runtime.workers import ClientInit, WorkerPool

        inits = [ClientInit(s.name, i, data.client_tokens[s.name]) for i, s in enumerate(specs)]
        emit("status", {"message": f"starting {min(cfg.workers, len(specs))} client worker processes"})
        pool = WorkerPool(cfg, inits, data.tokenizer, cfg.workers)
        return ParallelTransport(pool, [s.name for s in specs], network, on_step)
    clients = []
    for i, spec in enumerate(specs):
        client = make_client(cfg, spec.name, i, data.client_tokens[spec.name], data.tokenizer, device)
        client.on_step = on_step
        clients.append(client)
    return SimulatedTransport(clients, network)


def _train(cfg, run, data, device, strategy, network, transport, emit, started) -> tuple[RunDir, dict[str, Any]]:
    strat = cfg.federation.strategy
    client_tokens = {name: len(data.client_tokens[name]) for name in transport.client_names()}
    model = new_model(cfg, data.tokenizer).to(device)
    evaluator = make_evaluator(cfg, data.valid.tokens, device)
    if needs_server_eval(strat.name, strat.params):
        from skyfed.runtime.server_eval import make_params_evaluator

        evaluator_fn = make_params_evaluator(cfg, data.valid.tokens, new_model(cfg, data.tokenizer), device)
        strategy = build_strategy(strat.name, strat.params, evaluate_params=evaluator_fn)
    if network is not None:
        network.num_params = num_parameters(model)
    privacy: list = []  # skyfed.security hook: DP wrapper and the epsilon accountant
    strategy = apply_privacy(cfg, strategy, privacy)
    engine = Engine(cfg, transport, model, federated_parameter_names(model), strategy, evaluator, run, emit)
    engine.observers.extend(privacy)  # skyfed.security hook
    accounting = CloudAccounting(transport, network, cfg.clouds.aggregation_s) if network is not None else None
    if accounting is not None:
        engine.observers.append(accounting)
    emit("start", {
        "rounds": cfg.federation.rounds, "clients": list(client_tokens), "params": num_parameters(model),
        "client_tokens": client_tokens, "run_dir": str(run.path),
    })
    engine.run()
    emit("status", {"message": "final evaluation on the whole validation split"})
    final = evaluator(model, cfg.eval.final_max_batches)
    save_hf_model(model, data.tokenizer, run)
    summary = build_summary(run, final, data.unigram_ppl, time.perf_counter() - started, {
        "mode": "federated",
        "strategy": cfg.federation.strategy.name,
        "params": num_parameters(model),
        "client_tokens": client_tokens,
        "device": str(device),
        "workers": cfg.workers,
        **(accounting.summary() if accounting is not None else {}),
        **privacy_summary(privacy),  # skyfed.security hook: epsilon
    })
    run.write_summary(summary)
    return run, summary
