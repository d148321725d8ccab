"""Centralized baselines on the pooled data, with the same model and training tokens.

- ``sync``: synchronous data parallelism. One model; every step takes one batch from
  every client's shard together (batch = clients x batch_size), for as many steps as
  one client takes (rounds x local_steps). What the clouds would reach with free,
  instant communication: the reference DiLoCo (Douillard et al. 2023) compares against.
- ``sequential``: all tokens through one worker: batch_size, clients x rounds x
  local_steps steps on the pooled shards.

Both write the same run directory as a federated run (one metrics line per
"round-equivalent"), so every table can show how far federated is from them.

    skyfed run --baseline sync
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from skyfed.config import ExperimentConfig
from skyfed.errors import ConfigError
from skyfed.eval_plan import eval_fields, evaluate_round, evaluation_due
from skyfed.federation.engine import EventSink
from skyfed.metrics import RunDir
from skyfed.model import num_parameters
from skyfed.runtime.assemble import check_config, finish, prepare
from skyfed.train import LocalTrainer, sample_windows

BASELINES = ("sync", "sequential")


def run_baseline(
    cfg: ExperimentConfig, kind: str, out: str | Path | None = None, on_event: EventSink | None = None
) -> tuple[RunDir, dict[str, Any]]:
    if kind not in BASELINES:
        raise ConfigError(f"--baseline: unknown baseline {kind!r}; choose one of {', '.join(BASELINES)}")
    check_config(cfg)
    ctx = prepare(cfg, out, f"-baseline-{kind}", on_event)
    emit, data, model, evaluator = ctx.emit, ctx.data, ctx.model, ctx.evaluator
    shards = list(data.client_tokens.values())
    pooled = np.concatenate(shards)
    n_clients, rounds, k = len(shards), cfg.federation.rounds, cfg.train.local_steps
    tc = cfg.train
    if kind == "sync":
        steps_per_round = k

        def sample(rng: np.random.Generator) -> torch.Tensor:
            return torch.cat([sample_windows(s, tc.batch_size, tc.seq_len, rng) for s in shards])
    else:
        steps_per_round = n_clients * k

        def sample(rng: np.random.Generator) -> torch.Tensor:
            return sample_windows(pooled, tc.batch_size, tc.seq_len, rng)

    trainer = LocalTrainer(model, tc, ctx.device, rounds * steps_per_round)
    emit("start", {"rounds": rounds, "clients": [], "params": num_parameters(model), "run_dir": str(ctx.run_dir.path)})
    rng = np.random.default_rng([cfg.seed, 99])
    torch.manual_seed(cfg.seed)
    on_step = lambda step, loss: emit("local_step", {"client": kind, "step": step, "steps": steps_per_round, "loss": loss})  # noqa: E731
    tokens_total = 0
    for r in range(rounds):
        t0 = time.perf_counter()
        emit("round_start", {"round": r, "clients": [kind]})
        stats = trainer.train(pooled, steps_per_round, rng, on_step=on_step, sample=sample)
        tokens_total += stats.tokens
        t_eval, ev = time.perf_counter(), None
        if evaluation_due(r, rounds, cfg.eval.interval):
            ev = evaluate_round(evaluator, model, cfg.eval.max_batches, cfg.eval.max_tokens)
        record = {
            "round": r, "train_loss": {kind: stats.loss_mean}, **eval_fields(ev), "bytes_up": 0, "bytes_down": 0,
            "tokens": tokens_total, "compute_s": {kind: stats.seconds}, "eval_s": 0.0 if ev is None else time.perf_counter() - t_eval,
            "wall_time_s": time.perf_counter() - t0,
        }
        ctx.run_dir.append_metrics(record)
        emit("round_end", record)
    summary = finish(ctx, {"mode": f"baseline-{kind}", "train_tokens": tokens_total})
    return ctx.run_dir, summary
