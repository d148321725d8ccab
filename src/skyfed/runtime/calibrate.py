"""Measure this machine's training throughput for an experiment's model, to use as the
simulated clouds' reference (`clouds.reference_tokens_per_s`, scaled by each profile's
`speed`). Measured once and written into the config, so simulated runs stay deterministic.

    skyfed calibrate --preset smoke --steps 10
"""

from __future__ import annotations

import time

import numpy as np
import torch

from skyfed.config import ExperimentConfig
from skyfed.runtime.setup import apply_threads, device_for, new_model, prepare_data
from skyfed.train import LocalTrainer


def measure_tokens_per_s(cfg: ExperimentConfig, steps: int = 10, warmup: int = 2) -> dict[str, float]:
    """Tokens per second of `steps` local training steps after `warmup` untimed ones."""
    apply_threads(cfg)
    device = device_for(cfg)
    data = prepare_data(cfg)
    tokens = next(iter(data.client_tokens.values()))
    trainer = LocalTrainer(new_model(cfg, data.tokenizer), cfg.train, device, steps + warmup)
    rng = np.random.default_rng(cfg.seed)
    trainer.train(tokens, warmup, rng)
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    stats = trainer.train(tokens, steps, rng)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return {"tokens_per_s": stats.tokens / seconds, "steps": steps, "seconds": seconds, "device": str(device)}
