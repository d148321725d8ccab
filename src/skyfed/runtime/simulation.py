"""Run a whole federated experiment in one process: the clients are objects.

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
from skyfed.runtime.inprocess import SimulatedTransport
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
    clients = []
    for i, spec in enumerate(cfg.federation.clients):
        client = make_client(cfg, spec.name, i, data.client_tokens[spec.name], data.tokenizer, device)
        client.on_step = lambda name, step, steps, loss: emit("local_step", {"client": name, "step": step, "steps": steps, "loss": loss})
        clients.append(client)
    model = new_model(cfg, data.tokenizer).to(device)
    evaluator = make_evaluator(cfg, data.valid.tokens, device)
    if needs_server_eval(strat.name, strat.params):
        from skyfed.runtime.server_eval import make_params_evaluator

        evaluator_fn = make_params_evaluator(cfg, data.valid.tokens, new_model(cfg, data.tokenizer), device)
        strategy = build_strategy(strat.name, strat.params, evaluate_params=evaluator_fn)
    if network is not None:
        network.num_params = num_parameters(model)
    transport = SimulatedTransport(clients, network)
    engine = Engine(cfg, transport, model, federated_parameter_names(model), strategy, evaluator, run, emit)
    accounting = CloudAccounting(transport, network, cfg.clouds.aggregation_s) if network is not None else None
    if accounting is not None:
        engine.observers.append(accounting)
    emit("start", {
        "rounds": cfg.federation.rounds, "clients": [c.name for c in clients], "params": num_parameters(model),
        "client_tokens": {c.name: c.num_tokens for c in clients}, "run_dir": str(run.path),
    })
    engine.run()
    emit("status", {"message": "final evaluation on the whole validation split"})
    final = evaluator(model, cfg.eval.final_max_batches)
    save_hf_model(model, data.tokenizer, run)
    summary = build_summary(run, final, data.unigram_ppl, time.perf_counter() - started, {
        "mode": "federated",
        "strategy": cfg.federation.strategy.name,
        "params": num_parameters(model),
        "client_tokens": {c.name: c.num_tokens for c in clients},
        "device": str(device),
        **(accounting.summary() if accounting is not None else {}),
    })
    run.write_summary(summary)
    return run, summary
