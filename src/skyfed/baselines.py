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

from skyfed.config import ExperimentConfig, dump_config
from skyfed.errors import ConfigError
from skyfed.federation.engine import EventSink
from skyfed.metrics import RunDir
from skyfed.model import num_parameters
from skyfed.runtime.finish import build_summary, save_hf_model
from skyfed.runtime.setup import apply_threads, device_for, make_evaluator, new_model, prepare_data
from skyfed.train import LocalTrainer, sample_windows

BASELINES = ("sync", "sequential")


def run_baseline(
    cfg: ExperimentConfig, kind: str, out: str | Path | None = None, on_event: EventSink | None = None
) -> tuple[RunDir, dict[str, Any]]:
    if kind not in BASELINES:
        raise ConfigError(f"--baseline: unknown baseline {kind!r}; choose one of {', '.join(BASELINES)}")
    started = time.perf_counter()
    emit = on_event or (lambda k, d: None)
    apply_threads(cfg)
    device = device_for(cfg)
    run = RunDir(out or Path(cfg.out_dir) / f"{cfg.name}-baseline-{kind}-{time.strftime('%Y%m%d-%H%M%S')}")
    run.write_config(dump_config(cfg))
    emit("status", {"message": "preparing data and tokenizer"})
    data = prepare_data(cfg)
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

    model = new_model(cfg, data.tokenizer)
    trainer = LocalTrainer(model, tc, device, rounds * steps_per_round)
    evaluator = make_evaluator(cfg, data.valid.tokens, device)
    emit("start", {"rounds": rounds, "clients": [], "params": num_parameters(model), "run_dir": str(run.path)})
    rng = np.random.default_rng([cfg.seed, 99])
    torch.manual_seed(cfg.seed)
    on_step = lambda step, loss: emit("local_step", {"client": kind, "step": step, "steps": steps_per_round, "loss": loss})  # noqa: E731
    tokens_total = 0
    for r in range(rounds):
        t0 = time.perf_counter()
        emit("round_start", {"round": r, "clients": [kind]})
        stats = trainer.train(pooled, steps_per_round, rng, on_step=on_step, sample=sample)
        tokens_total += stats.tokens
        ev = evaluator(model, cfg.eval.max_batches)
        record = {
            "round": r, "train_loss": {kind: stats.loss_mean}, "val_loss": ev.loss, "val_ppl": ev.ppl,
            "val_token_acc": ev.token_acc, "bytes_up": 0, "bytes_down": 0, "tokens": tokens_total,
            "compute_s": {kind: stats.seconds}, "wall_time_s": time.perf_counter() - t0,
        }
        run.append_metrics(record)
        emit("round_end", record)
    final = evaluator(model, cfg.eval.final_max_batches)
    save_hf_model(model, data.tokenizer, run)
    summary = build_summary(run, final, data.unigram_ppl, time.perf_counter() - started, {
        "mode": f"baseline-{kind}", "params": num_parameters(model), "train_tokens": tokens_total, "device": str(device),
    })
    run.write_summary(summary)
    return run, summary
