"""The server's own small validation set, for strategies that score client models on it
(dynamic weighting with `score: server`).

In simulation the server's set is the last `server_tokens` tokens of the validation
split. It overlaps the split that metrics.jsonl reports on, so the reported validation
loss of a `score: server` run is slightly optimistic; a deployment gives the server its
own held-out text instead.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from skyfed.config import ExperimentConfig
from skyfed.model import set_params
from skyfed.train import evaluate

Params = dict[str, torch.Tensor]


def make_params_evaluator(
    cfg: ExperimentConfig, valid_tokens: np.ndarray, scratch: torch.nn.Module, device: torch.device
) -> Callable[[Params], float]:
    """`evaluate_params(params) -> loss` of a candidate parameter dict on the server's set."""
    n = int(cfg.federation.strategy.params.get("server_tokens", 4096))
    tokens = np.asarray(valid_tokens[-min(n, len(valid_tokens)):])
    scratch = scratch.to(device)

    def evaluate_params(params: Params) -> float:
        set_params(scratch, params)
        return evaluate(scratch, tokens, cfg.train.seq_len, cfg.eval.batch_size, device).loss

    return evaluate_params
