"""Pure aggregation helpers shared by strategies (tested on their own)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

Params = dict[str, torch.Tensor]


def normalize(weights: Sequence[float]) -> list[float]:
    total = float(sum(weights))
    if total <= 0:
        raise ValueError(f"weights must have a positive sum, got {list(weights)}")
    return [float(w) / total for w in weights]


def weighted_mean(tensors: Sequence[Params], weights: Sequence[float]) -> Params:
    """sum_i w_i * t_i per name, with weights normalized to sum to one."""
    w = normalize(weights)
    out: Params = {}
    for name in tensors[0]:
        acc = torch.zeros_like(tensors[0][name], dtype=torch.float32)
        for wi, t in zip(w, tensors):
            acc.add_(t[name].to(torch.float32), alpha=wi)
        out[name] = acc.to(tensors[0][name].dtype)
    return out


def apply_delta(params: Params, delta: Params, lr: float = 1.0) -> Params:
    """params - lr * delta (delta = theta_start - theta_end, the DiLoCo sign)."""
    return {name: p - lr * delta[name].to(p.dtype) for name, p in params.items()}
