"""Coordinate-wise median and trimmed mean of the round's deltas.

Yin, Chen, Ramchandran and Bartlett 2018, "Byzantine-Robust Distributed Learning:
Towards Optimal Statistical Rates", ICML, arXiv:1803.01498.

median: every coordinate of the aggregate is the median of the clients' values for it
(the mean of the two middle values when n is even). trimmed_mean: per coordinate, the
floor(beta * n) largest and smallest values are dropped and the rest averaged; with
beta = 0 it is the unweighted mean. Neither uses the clients' token counts, which a
Byzantine client could inflate; then x <- x - server_lr * aggregate.
"""

from __future__ import annotations

from typing import Any

from skyfed.federation.messages import Update
from skyfed.federation.strategies.base import Params
from skyfed.federation.strategies.params import number
from skyfed.federation.strategies.robust.base import RobustStrategy
from skyfed.federation.strategies.robust.robust_math import coordinate_median, trim_count, trimmed_mean


class Median(RobustStrategy):
    """Yin et al. 2018, "Byzantine-Robust Distributed Learning: Towards Optimal Statistical
    Rates", ICML, arXiv:1803.01498 (coordinate-wise median)."""

    name = "median"
    description = "robust: coordinate-wise median of the deltas"
    paper = "Yin et al. 2018, arXiv:1803.01498"

    def __init__(self, server_lr: float = 1.0):
        self.server_lr = number("server_lr", server_lr, 0.0, lo_open=True)

    def robust_delta(self, updates: list[Update]) -> tuple[Params, dict[str, Any]]:
        return coordinate_median([u.delta for u in updates]), {"robust": {"rule": "median", "n": len(updates)}}


class TrimmedMean(RobustStrategy):
    """Yin et al. 2018, "Byzantine-Robust Distributed Learning: Towards Optimal Statistical
    Rates", ICML, arXiv:1803.01498 (coordinate-wise trimmed mean)."""

    name = "trimmed_mean"
    description = "robust: per coordinate, drop the beta largest and smallest values, average the rest"
    paper = "Yin et al. 2018, arXiv:1803.01498"

    def __init__(self, beta: float = 0.2, server_lr: float = 1.0):
        self.beta = number("beta", beta, 0.0, 0.49)
        self.server_lr = number("server_lr", server_lr, 0.0, lo_open=True)

    def robust_delta(self, updates: list[Update]) -> tuple[Params, dict[str, Any]]:
        k = trim_count(len(updates), self.beta)
        return trimmed_mean([u.delta for u in updates], k), {"robust": {"rule": "trimmed_mean", "n": len(updates), "trimmed_each_end": k}}
