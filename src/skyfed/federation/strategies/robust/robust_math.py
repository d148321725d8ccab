"""Pure arithmetic of the robust aggregators, on lists of named tensors (tested exactly).

Every function maps updates (dicts name -> tensor, all with the same names and shapes)
to numbers or tensors, works one parameter tensor at a time (never one n x d matrix of
the whole model) and keeps no state. Coordinate-wise rules (median, trimmed mean) are
applied to each scalar coordinate independently; distance-based rules (Krum, centered
clipping) use the global L2 norm over all tensors of an update.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

Params = dict[str, torch.Tensor]


def _stack(updates: Sequence[Params], name: str) -> torch.Tensor:
    return torch.stack([u[name].to(torch.float32) for u in updates])


def mean(updates: Sequence[Params], weights: Sequence[float] | None = None) -> Params:
    """The (weighted, normalized) mean per name; uniform without weights."""
    if weights is None:
        weights = [1.0] * len(updates)
    total = float(sum(weights))
    if total <= 0:
        raise ValueError(f"weights must have a positive sum, got {list(weights)}")
    out: Params = {}
    for name in updates[0]:
        acc = torch.zeros_like(updates[0][name], dtype=torch.float32)
        for w, u in zip(weights, updates):
            acc.add_(u[name].to(torch.float32), alpha=float(w) / total)
        out[name] = acc
    return out


def coordinate_median(updates: Sequence[Params]) -> Params:
    """Per coordinate, the median of the n values (the mean of the two middle ones for even n).

    Yin et al. 2018, "Byzantine-Robust Distributed Learning: Towards Optimal Statistical
    Rates", ICML, arXiv:1803.01498 (coordinate-wise median)."""
    n = len(updates)
    out: Params = {}
    for name in updates[0]:
        s = _stack(updates, name).sort(dim=0).values
        out[name] = s[n // 2].clone() if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2
    return out


def trim_count(n: int, beta: float) -> int:
    """How many values to drop at each end: floor(beta * n), so that at least one remains."""
    k = int(math.floor(beta * n + 1e-9))
    return min(k, (n - 1) // 2)


def trimmed_mean(updates: Sequence[Params], trim: int) -> Params:
    """Per coordinate, drop the `trim` largest and `trim` smallest values and average the rest.

    Yin et al. 2018, arXiv:1803.01498 (coordinate-wise trimmed mean)."""
    n = len(updates)
    if trim < 0 or n - 2 * trim < 1:
        raise ValueError(f"cannot trim {trim} from each end of {n} values")
    out: Params = {}
    for name in updates[0]:
        s = _stack(updates, name).sort(dim=0).values
        out[name] = s[trim : n - trim].mean(dim=0)
    return out


def global_norm(update: Params) -> float:
    """The L2 norm of all of an update's tensors together (float64 accumulation)."""
    return math.sqrt(sum(float(t.to(torch.float64).pow(2).sum()) for t in update.values()))


def scaled(update: Params, factor: float) -> Params:
    """factor * update, new float32 tensors."""
    return {n: t.to(torch.float32) * factor for n, t in update.items()}


def clip_to_norm(update: Params, bound: float) -> tuple[Params, float]:
    """The update scaled down to global L2 norm <= bound: (clipped, its original norm).
    An update already within the bound is returned as is (not copied)."""
    norm = global_norm(update)
    if norm <= bound:
        return update, norm
    return scaled(update, bound / norm), norm


def pairwise_sq_distances(updates: Sequence[Params]) -> torch.Tensor:
    """n x n matrix of squared L2 distances between whole updates (float64)."""
    n = len(updates)
    d = torch.zeros((n, n), dtype=torch.float64)
    for name in updates[0]:
        s = _stack(updates, name).reshape(n, -1).to(torch.float64)
        for i in range(n):
            d[i, i + 1 :] += (s[i + 1 :] - s[i]).pow(2).sum(dim=1)
    return d + d.T


def krum_scores(sq_dist: torch.Tensor, f: int) -> list[float]:
    """Krum's score of each update: the sum of its squared distances to its n - f - 2
    nearest other updates (at least one neighbour, at most n - 1).

    Blanchard et al. 2017, "Machine Learning with Adversaries: Byzantine Tolerant
    Gradient Descent", NeurIPS, arXiv:1703.02757."""
    n = sq_dist.shape[0]
    k = max(1, min(n - 1, n - f - 2))
    if n == 1:
        return [0.0]
    scores = []
    for i in range(n):
        others = torch.cat([sq_dist[i, :i], sq_dist[i, i + 1 :]])
        scores.append(float(others.sort().values[:k].sum()))
    return scores


def lowest(scores: Sequence[float], m: int) -> list[int]:
    """Indices of the m lowest scores (ties: the earlier index), in index order."""
    order = sorted(range(len(scores)), key=lambda i: (scores[i], i))
    return sorted(order[:m])


def centered_clip(updates: Sequence[Params], center: Params, tau: float | None, iterations: int) -> tuple[Params, list[float]]:
    """Centered clipping: `iterations` times, v <- v + mean_i (x_i - v) * min(1, tau / ||x_i - v||).

    Karimireddy, He and Jaggi 2021, "Learning from History for Byzantine Robust
    Optimization", ICML, arXiv:2012.10333. With tau None, each iteration uses the median
    of the distances ||x_i - v|| (an adaptive radius; the paper fixes tau). Returns the
    final v and the clipping factors of the last iteration, one per update."""
    v = {n: t.to(torch.float32).clone() for n, t in center.items()}
    n = len(updates)
    factors = [1.0] * n
    for _ in range(iterations):
        diffs = [{name: u[name].to(torch.float32) - v[name] for name in v} for u in updates]
        norms = [global_norm(d) for d in diffs]
        radius = tau if tau is not None else _median(sorted(norms))
        factors = [1.0 if d <= radius else (radius / d if d > 0 else 1.0) for d in norms]
        for name in v:
            step = torch.zeros_like(v[name])
            for d, c in zip(diffs, factors):
                step.add_(d[name], alpha=c / n)
            v[name] += step
    return v, factors


def mad_band(values: Sequence[float], k: float, min_margin: float) -> tuple[float, float]:
    """median -/+ max(k * MAD, min_margin) over the finite values (MAD: the median absolute
    deviation from the median); (-inf, inf) when none is finite."""
    finite = sorted(v for v in values if math.isfinite(v))
    if not finite:
        return -math.inf, math.inf
    med = _median(finite)
    margin = max(k * _median(sorted(abs(v - med) for v in finite)), min_margin)
    return med - margin, med + margin


def _median(sorted_values: Sequence[float]) -> float:
    n = len(sorted_values)
    return sorted_values[n // 2] if n % 2 else (sorted_values[n // 2 - 1] + sorted_values[n // 2]) / 2
