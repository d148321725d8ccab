"""Pure aggregation helpers shared by strategies (tested on their own).

Nothing here keeps state or knows about rounds, clients or transports: each function
maps numbers and tensors to numbers and tensors, so each is checked with exact
arithmetic in `tests/test_aggregate.py`.
"""

from __future__ import annotations

import math
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
    return weighted_sum(tensors, normalize(weights))


def weighted_sum(tensors: Sequence[Params], weights: Sequence[float]) -> Params:
    """sum_i w_i * t_i per name, weights taken as given (not normalized)."""
    out: Params = {}
    for name in tensors[0]:
        acc = torch.zeros_like(tensors[0][name], dtype=torch.float32)
        for wi, t in zip(weights, tensors):
            acc.add_(t[name].to(torch.float32), alpha=float(wi))
        out[name] = acc.to(tensors[0][name].dtype)
    return out


def apply_delta(params: Params, delta: Params, lr: float = 1.0, in_place: bool = False) -> Params:
    """params - lr * delta (delta = theta_start - theta_end, the DiLoCo sign), one new
    tensor per name (no lr * delta temporary); with `in_place`, written over `delta`'s
    tensors instead (the same values: a mean the caller no longer needs becomes the
    result, and no second model-sized allocation is made)."""
    if in_place:
        return {name: torch.sub(p, delta[name], alpha=lr, out=delta[name]) if delta[name].dtype == p.dtype
                else torch.sub(p, delta[name].to(p.dtype), alpha=lr) for name, p in params.items()}
    return {name: torch.sub(p, delta[name].to(p.dtype), alpha=lr) for name, p in params.items()}


def mix(params: Params, other: Params, alpha: float) -> Params:
    """(1 - alpha) * params + alpha * other: FedAsync's mixing step."""
    return {name: (1.0 - alpha) * p + alpha * other[name].to(p.dtype) for name, p in params.items()}


# ---------------------------------------------------------------- loss -> weight


def softmax_weights(losses: Sequence[float], temperature: float) -> list[float]:
    """softmax(-loss / temperature): lower loss, larger weight (shifted for stability)."""
    scaled = [-float(l) / temperature for l in losses]
    top = max(scaled)
    exps = [math.exp(s - top) for s in scaled]
    return normalize(exps)


def inverse_weights(losses: Sequence[float], power: float) -> list[float]:
    """loss^-power, normalized: a client with half the loss gets 2^power times the weight."""
    if any(l <= 0 or not math.isfinite(l) for l in losses):
        raise ValueError(f"inverse weighting needs positive finite losses, got {list(losses)}")
    return normalize([float(l) ** -power for l in losses])


def apply_floor(weights: Sequence[float], floor: float) -> list[float]:
    """Normalized weights in which every share is at least `floor` (0 <= floor <= 1/n).

    Shares below the floor are raised to it and the others scaled down so the total
    stays one; repeated until no share falls below (at most n passes). With floor = 1/n
    every client gets exactly 1/n.
    """
    w = normalize(weights)
    n = len(w)
    if not 0.0 <= floor <= 1.0 / n + 1e-12:
        raise ValueError(f"floor {floor} must be in [0, 1/{n}]")
    fixed: set[int] = set()
    for _ in range(n):
        low = {i for i, x in enumerate(w) if x < floor - 1e-15 and i not in fixed}
        if not low:
            break
        fixed |= low
        free = [i for i in range(n) if i not in fixed]
        rest = 1.0 - floor * len(fixed)
        free_total = sum(w[i] for i in free)
        w = [floor if i in fixed else (w[i] / free_total * rest if free_total > 0 else rest / len(free)) for i in range(n)]
    return w


# ---------------------------------------------------------------- staleness


def staleness_weight(staleness: int, kind: str = "constant", a: float = 0.5, b: int = 4) -> float:
    """s(tau) of Xie et al. 2019 (FedAsync), Section 5.2.

    constant: 1;  polynomial: (tau + 1)^-a;  hinge: 1 if tau <= b else 1 / (a (tau - b) + 1).
    """
    if staleness < 0:
        raise ValueError(f"staleness must be >= 0, got {staleness}")
    if kind == "constant":
        return 1.0
    if kind == "polynomial":
        return float((staleness + 1) ** -a)
    if kind == "hinge":
        return 1.0 if staleness <= b else 1.0 / (a * (staleness - b) + 1.0)
    raise ValueError(f"unknown staleness function {kind!r}")
