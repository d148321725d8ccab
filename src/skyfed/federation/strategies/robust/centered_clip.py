"""Centered clipping: move a centre towards each update by at most tau.

Karimireddy, He and Jaggi 2021, "Learning from History for Byzantine Robust
Optimization", ICML, arXiv:2012.10333.

Starting from the previous round's aggregate (zero in the first round: the "history"
of the paper, here kept across rounds and checkpointed), `iterations` times:

    v <- v + (1/n) sum_i (delta_i - v) * min(1, tau / ||delta_i - v||)

so an update far from the centre pulls it by at most tau / n. With `tau` unset the
radius of each iteration is the median of the distances ||delta_i - v|| (adaptive; the
paper uses a fixed tau). Then x <- x - server_lr * v.
"""

from __future__ import annotations

from typing import Any

import torch

from skyfed.federation.messages import Update
from skyfed.federation.strategies.base import Params
from skyfed.federation.strategies.params import integer, number
from skyfed.federation.strategies.robust.base import RobustStrategy
from skyfed.federation.strategies.robust.robust_math import centered_clip


class CenteredClip(RobustStrategy):
    """Karimireddy, He and Jaggi 2021, "Learning from History for Byzantine Robust
    Optimization", ICML, arXiv:2012.10333."""

    name = "centered_clip"
    description = "robust: clip each update's distance to a centre (last aggregate) to tau, iterate"
    paper = "Karimireddy et al. 2021, arXiv:2012.10333"

    def __init__(self, tau: float | None = None, iterations: int = 3, server_lr: float = 1.0):
        self.tau = None if tau is None else number("tau", tau, 0.0, lo_open=True)
        self.iterations = integer("iterations", iterations, 1)
        self.server_lr = number("server_lr", server_lr, 0.0, lo_open=True)
        self.center: Params | None = None  # the previous aggregate

    def robust_delta(self, updates: list[Update]) -> tuple[Params, dict[str, Any]]:
        start = self.center if self.center is not None else {n: torch.zeros_like(t, dtype=torch.float32) for n, t in updates[0].delta.items()}
        v, factors = centered_clip([u.delta for u in updates], start, self.tau, self.iterations)
        self.center = {n: t.clone() for n, t in v.items()}
        return v, {"robust": {"rule": self.name, "clip_factors": {u.client: c for u, c in zip(updates, factors)}}}

    def state_dict(self) -> dict[str, Any]:
        return {"center": None if self.center is None else {n: t.clone() for n, t in self.center.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        c = state.get("center")
        self.center = None if c is None else {n: t.clone() for n, t in c.items()}
