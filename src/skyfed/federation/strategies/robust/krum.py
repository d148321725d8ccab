"""Krum and multi-Krum: keep the updates closest to their neighbours.

Blanchard, El Mhamdi, Guerraoui and Stainer 2017, "Machine Learning with Adversaries:
Byzantine Tolerant Gradient Descent", NeurIPS, arXiv:1703.02757.

Each update i gets the score sum of ||delta_i - delta_j||^2 over its n - f - 2 nearest
other updates (f: the number of Byzantine clients tolerated; the guarantee needs
n > 2f + 2, otherwise a warning is logged and at least one neighbour is used). Krum
takes the single update with the lowest score; multi-Krum averages (unweighted) the m
lowest-scored (m defaults to n - f). Then x <- x - server_lr * aggregate.
"""

from __future__ import annotations

import logging
from typing import Any

from skyfed.federation.messages import Update
from skyfed.federation.strategies.base import Params
from skyfed.federation.strategies.params import integer, number
from skyfed.federation.strategies.robust.base import RobustStrategy
from skyfed.federation.strategies.robust.robust_math import krum_scores, lowest, mean, pairwise_sq_distances

log = logging.getLogger(__name__)


class MultiKrum(RobustStrategy):
    """Blanchard et al. 2017, "Machine Learning with Adversaries: Byzantine Tolerant
    Gradient Descent", NeurIPS, arXiv:1703.02757 (multi-Krum)."""

    name = "multikrum"
    description = "robust: average the m updates closest to their n - f - 2 nearest neighbours"
    paper = "Blanchard et al. 2017, arXiv:1703.02757"

    def __init__(self, f: int = 1, m: int | None = None, server_lr: float = 1.0):
        self.f = integer("f", f, 0)
        self.m = integer("m", m, 1, optional=True)
        self.server_lr = number("server_lr", server_lr, 0.0, lo_open=True)

    def selected_count(self, n: int) -> int:
        return max(1, min(n, self.m if self.m is not None else n - self.f))

    def robust_delta(self, updates: list[Update]) -> tuple[Params, dict[str, Any]]:
        n = len(updates)
        if n <= 2 * self.f + 2:
            log.warning("%s: %d updates <= 2f + 2 = %d: the Byzantine guarantee does not hold this round", self.name, n, 2 * self.f + 2)
        scores = krum_scores(pairwise_sq_distances([u.delta for u in updates]), self.f)
        chosen = lowest(scores, self.selected_count(n))
        delta = mean([updates[i].delta for i in chosen])
        picked = [updates[i].client for i in chosen]
        return delta, {
            "weights": {u.client: (1.0 / len(chosen) if i in chosen else 0.0) for i, u in enumerate(updates)},
            "robust": {"rule": self.name, "scores": {u.client: s for u, s in zip(updates, scores)}, "selected": picked},
        }


class Krum(MultiKrum):
    """Blanchard et al. 2017, "Machine Learning with Adversaries: Byzantine Tolerant
    Gradient Descent", NeurIPS, arXiv:1703.02757 (Krum)."""

    name = "krum"
    description = "robust: the one update closest to its n - f - 2 nearest neighbours"
    paper = "Blanchard et al. 2017, arXiv:1703.02757"

    def __init__(self, f: int = 1, server_lr: float = 1.0):
        super().__init__(f=f, m=1, server_lr=server_lr)
