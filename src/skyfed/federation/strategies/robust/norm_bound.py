"""Norm bounding around any strategy: each update's delta is scaled down to L2 norm <= C.

Sun, Kairouz, Suresh and McMahan 2019, "Can You Really Backdoor Federated Learning?",
arXiv:1911.07963 (norm difference clipping). Chosen in the YAML as

    federation:
      strategy: {name: fedavg, norm_bound: 0.5}

The bound is on the global L2 norm of all of an update's tensors. The wrapper keeps the
kind of the strategy it wraps, so the engine treats it the same way: a `MeanStrategy`
(FedAvg, FedOpt, ...) still folds updates one at a time (each clipped before it is
folded), an `AsyncStrategy` clips in `on_update`, any other clips the round's list.
Every update's norm, and which ones were clipped, go to metrics.jsonl under
"norm_bound" ({"bound", "clipped": {client: norm}, "norms": {client: norm}}), which is
how to choose C: a little above the honest clients' norms.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any

from skyfed.errors import ConfigError
from skyfed.federation.messages import Update
from skyfed.federation.strategies.base import AggregateResult, AsyncStrategy, Params, Strategy
from skyfed.federation.strategies.mean import MeanStrategy, RunningMean
from skyfed.federation.strategies.robust.robust_math import clip_to_norm

log = logging.getLogger(__name__)


class _Clipper:
    """Clips updates to `bound` and remembers which ones it clipped since the last report."""

    def __init__(self, inner: Strategy, bound: float):
        self.inner = inner
        self.bound = bound
        self.clipped: dict[str, float] = {}
        self.norms: dict[str, float] = {}  # every update's norm since the last report (to choose C)
        self.name = inner.name
        self.description = inner.description
        self.paper = inner.paper

    def clip(self, update: Update) -> Update:
        delta, norm = clip_to_norm(update.delta, self.bound)
        self.norms[update.client] = norm
        if delta is update.delta:
            return update
        self.clipped[update.client] = norm
        log.info("norm_bound: %s's update of norm %.4g scaled down to %.4g", update.client, norm, self.bound)
        return dataclasses.replace(update, delta=delta)

    def report(self, result: AggregateResult | None) -> AggregateResult | None:
        if result is not None:
            result.metrics = {
                **result.metrics,
                "norm_bound": {"bound": self.bound, "clipped": dict(self.clipped), "norms": dict(self.norms)},
            }
            self.clipped, self.norms = {}, {}
        return result

    def client_options(self, round: int) -> dict[str, Any]:
        return self.inner.client_options(round)

    def state_dict(self) -> dict[str, Any]:
        return self.inner.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.inner.load_state_dict(state)


class NormBoundedMean(_Clipper, MeanStrategy):
    def weight(self, update: Update) -> float:
        return self.inner.weight(update)  # type: ignore[attr-defined]

    def step(self, global_params: Params, mean_delta: Params, weights: dict[str, float], round: int) -> AggregateResult:
        return self.inner.step(global_params, mean_delta, weights, round)  # type: ignore[attr-defined]

    def fold(self, running: RunningMean, update: Update) -> None:
        self.inner.fold(running, self.clip(update))  # type: ignore[attr-defined]

    def finish(self, global_params: Params, running: RunningMean, round: int) -> AggregateResult:
        return self.report(self.inner.finish(global_params, running, round))  # type: ignore[attr-defined]


class NormBoundedAsync(_Clipper, AsyncStrategy):
    @property
    def needs_base_params(self) -> bool:  # type: ignore[override]
        return self.inner.needs_base_params  # type: ignore[attr-defined]

    @property
    def max_staleness(self) -> int | None:  # type: ignore[override]
        return self.inner.max_staleness  # type: ignore[attr-defined]

    def on_update(self, global_params: Params, update: Update, base_params: Params | None) -> AggregateResult | None:
        return self.report(self.inner.on_update(global_params, self.clip(update), base_params))  # type: ignore[attr-defined]

    def flush(self, global_params: Params) -> AggregateResult | None:
        return self.report(self.inner.flush(global_params))  # type: ignore[attr-defined]


class NormBounded(_Clipper, Strategy):
    def aggregate(self, global_params: Params, updates: list[Update], round: int) -> AggregateResult:
        return self.report(self.inner.aggregate(global_params, [self.clip(u) for u in updates], round))  # type: ignore[return-value]


def with_norm_bound(strategy: Strategy, bound: float | None) -> Strategy:
    """`strategy` itself without a bound; else the wrapper of its kind."""
    if bound is None:
        return strategy
    if isinstance(bound, bool) or not isinstance(bound, (int, float)) or not math.isfinite(bound) or bound <= 0:
        raise ConfigError(f"federation.strategy.norm_bound: must be a positive number, got {bound!r}")
    if isinstance(strategy, MeanStrategy):
        return NormBoundedMean(strategy, float(bound))
    if isinstance(strategy, AsyncStrategy):
        return NormBoundedAsync(strategy, float(bound))
    return NormBounded(strategy, float(bound))
