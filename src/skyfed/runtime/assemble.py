"""Build a run and finish it: the one place every runtime sets up and tears down.

    run = assemble(cfg, transport_factory, out)   threads, device, run directory, data,
                                                  transport, model, strategy, engine,
                                                  observers, resume
    run.engine.run()                              (the runtime's own loop around it)
    summary = finish(run, extra)                  final evaluation on the whole split,
                                                  the Hugging Face model, summary.json

The simulation, the Ray runtime and the gRPC server differ only in the transport
factory they pass; the centralized baselines use `prepare` and `finish` around their
own training loop.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from skyfed.config import ExperimentConfig, dump_config
from skyfed.errors import ConfigError
from skyfed.federation.engine import Engine, EventSink, Evaluator
from skyfed.federation.strategies import build_strategy, needs_server_eval
from skyfed.federation.transport import Transport
from skyfed.metrics import RunDir
from skyfed.model import federated_parameter_names, num_parameters
from skyfed.runtime.finish import build_summary, save_hf_model
from skyfed.runtime.setup import PreparedData, apply_threads, device_for, make_evaluator, new_model, prepare_data

log = logging.getLogger(__name__)

# (config, prepared data, device, event sink) -> the transport that reaches the clients
TransportFactory = Callable[[ExperimentConfig, PreparedData, torch.device, EventSink], Transport]


@dataclass
class RunContext:
    """What every run has: its config, directory, data, device, model and evaluator."""

    cfg: ExperimentConfig
    run_dir: RunDir
    data: PreparedData
    device: torch.device
    model: torch.nn.Module
    evaluator: Evaluator
    emit: EventSink
    started: float = field(default_factory=time.perf_counter)


@dataclass
class Run(RunContext):
    """A federated run: the context plus the transport, the engine and its observers."""

    transport: Transport | None = None
    engine: Engine | None = None
    accounting: Any | None = None  # skyfed.runtime.cloud_metrics.CloudAccounting (simulated clouds)
    trackers: list[Any] = field(default_factory=list)  # TensorBoard / MLflow (skyfed.tracking)
    privacy: list[Any] = field(default_factory=list)  # skyfed.security.privacy.PrivacyAccountant


def default_run_dir(cfg: ExperimentConfig, label: str = "") -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path(cfg.out_dir) / f"{cfg.name}{label}-{stamp}"


def server_side_config(cfg: ExperimentConfig) -> ExperimentConfig:
    """The server never reads clients' local data paths (they live on the clients)."""
    clients = [spec.model_copy(update={"data": None}) for spec in cfg.federation.clients]
    return cfg.model_copy(update={"federation": cfg.federation.model_copy(update={"clients": clients})})


def _open_run_dir(cfg: ExperimentConfig, out: str | Path | None, label: str, resume: bool) -> RunDir:
    if not resume:
        run = RunDir(out or default_run_dir(cfg, label))
        run.write_config(dump_config(cfg))
        return run
    if out is None:
        raise ConfigError("--resume needs --out: the run directory of the interrupted run")
    folder = Path(out)
    if not folder.is_dir():
        raise ConfigError(f"--resume: run directory {folder} does not exist")
    saved = folder / "config.yaml"
    if saved.exists() and saved.read_text() != dump_config(cfg):
        raise ConfigError(f"--resume: the config differs from the one in {saved}; resume with the same config")
    run = RunDir(folder)
    run.write_config(dump_config(cfg))
    return run


def _data_and_dir(
    cfg: ExperimentConfig, out: str | Path | None, label: str, resume: bool, emit: EventSink, server_side: bool
) -> tuple[RunDir, PreparedData, torch.device]:
    apply_threads(cfg)
    device = device_for(cfg)
    run = _open_run_dir(cfg, out, label, resume)
    emit("status", {"message": "preparing data and tokenizer"})
    data = prepare_data(server_side_config(cfg) if server_side else cfg)
    if data.partition is not None:
        run.write_json("partition.json", data.partition.stats)
    return run, data, device


def prepare(
    cfg: ExperimentConfig, out: str | Path | None = None, label: str = "", on_event: EventSink | None = None
) -> RunContext:
    """Threads, device, run directory (config written), data, a fresh model, the evaluator."""
    started = time.perf_counter()
    emit = on_event or (lambda kind, data: None)
    run, data, device = _data_and_dir(cfg, out, label, False, emit, False)
    model = new_model(cfg, data.tokenizer).to(device)
    return RunContext(cfg, run, data, device, model, make_evaluator(cfg, data.valid.tokens, device), emit, started)


def _strategy(cfg: ExperimentConfig, data: PreparedData, device: torch.device, privacy: list[Any]):
    """The configured strategy (with the server's evaluator where it scores candidates),
    wrapped for differential privacy when `security.dp` asks (its accountant joins `privacy`)."""
    from skyfed.security.privacy import apply_privacy

    strat = cfg.federation.strategy
    evaluate_params = None
    if needs_server_eval(strat.name, strat.params):
        from skyfed.runtime.server_eval import make_params_evaluator

        evaluate_params = make_params_evaluator(cfg, data.valid.tokens, new_model(cfg, data.tokenizer), device)
    strategy = build_strategy(strat.name, strat.params, evaluate_params=evaluate_params, norm_bound=strat.norm_bound,
                              train_config=cfg.train, total_rounds=cfg.federation.rounds)
    return apply_privacy(cfg, strategy, privacy)


def check_config(cfg: ExperimentConfig, simulated: bool = True) -> None:
    """Errors a config can have that the schema does not see, before any work (the cloud
    profiles only matter where the clouds are simulated)."""
    strat = cfg.federation.strategy
    build_strategy(strat.name, strat.params, evaluate_params=lambda params: 0.0, norm_bound=strat.norm_bound,
                   train_config=cfg.train, total_rounds=cfg.federation.rounds)
    if simulated and cfg.clouds.simulate:
        from skyfed.clouds import network_from_config

        network_from_config(cfg, 0)


def assemble(
    cfg: ExperimentConfig,
    transport: TransportFactory,
    out: str | Path | None = None,
    on_event: EventSink | None = None,
    resume: bool = False,
    server_side: bool = False,
) -> Run:
    """Everything a federated run needs, up to `run.engine.run()`; with `resume`, every
    registered part restored from the checkpoint in `out`."""
    started = time.perf_counter()
    emit = on_event or (lambda kind, data: None)
    check_config(cfg, simulated=not server_side)
    run_dir, data, device = _data_and_dir(cfg, out, "", resume, emit, server_side)
    link = transport(cfg, data, device, emit)
    try:
        model = new_model(cfg, data.tokenizer).to(device)
        evaluator = make_evaluator(cfg, data.valid.tokens, device)
        privacy: list[Any] = []  # the privacy accountant, when security.dp is on
        strategy = _strategy(cfg, data, device, privacy)
        engine = Engine(cfg, link, model, federated_parameter_names(model), strategy, evaluator, run_dir, emit)
        run = Run(cfg, run_dir, data, device, model, evaluator, emit, started, link, engine, privacy=privacy)
        engine.observers.extend(privacy)
        engine.checkpointer.parts.update(link.checkpoint_parts())
        network = getattr(link, "network", None)
        if network is not None:
            from skyfed.runtime.cloud_metrics import CloudAccounting

            network.num_params = num_parameters(model)
            run.accounting = CloudAccounting(link, network, cfg.clouds.aggregation_s)
            engine.observers.append(run.accounting)
        from skyfed.tracking import make_trackers

        run.trackers = make_trackers(cfg, run_dir)  # last: they see every other observer's fields
        engine.observers.extend(run.trackers)
        if resume:
            if engine.checkpointer.exists():
                engine.resume()
                last = (run_dir.read_metrics() or [{}])[-1]
                for accountant in privacy:  # the privacy ledgers continue from the last line
                    accountant.resume_from(last)
            else:
                log.warning("--resume: no checkpoint in %s yet (stopped in round 0?): starting from round 0", run_dir.path)
                run_dir.truncate_metrics(-1)
    except BaseException:
        link.close()
        raise
    emit("start", {
        "rounds": cfg.federation.rounds, "clients": link.client_names(), "params": num_parameters(model),
        "client_tokens": {n: len(data.client_tokens[n]) for n in link.client_names() if n in data.client_tokens},
        "run_dir": str(run_dir.path), "start_round": engine.next_round,
    })
    return run


def finish(ctx: RunContext, extra: dict[str, Any]) -> dict[str, Any]:
    """Final evaluation on the whole validation split, the HF model and summary.json."""
    ctx.emit("status", {"message": "final evaluation on the whole validation split"})
    final = ctx.evaluator(ctx.model, ctx.cfg.eval.final_max_batches)
    peft = ctx.cfg.model.peft
    save_hf_model(ctx.model, ctx.data.tokenizer, ctx.run_dir, folded_base=peft is not None and peft.aggregation == "exact")
    fields = {"params": num_parameters(ctx.model), "device": str(ctx.device), **extra}
    if isinstance(ctx, Run):
        fields = {"mode": "federated", "strategy": ctx.cfg.federation.strategy.name, **fields}
        if ctx.accounting is not None:
            fields.update(ctx.accounting.summary())
        from skyfed.security.privacy import privacy_summary

        fields.update(privacy_summary(ctx.privacy))
    from skyfed.eval_plan import eval_summary

    fields["eval"] = eval_summary(ctx.cfg, ctx.run_dir.read_metrics(), final, len(ctx.data.valid.tokens))
    summary = build_summary(ctx.run_dir, final, ctx.data.unigram_ppl, time.perf_counter() - ctx.started, fields)
    ctx.run_dir.write_summary(summary)
    if isinstance(ctx, Run):
        from skyfed.tracking import close_trackers

        close_trackers(ctx.trackers, summary)
    return summary
