"""Strategies that step on the weighted mean of a round's deltas, folded as updates arrive.

FedAvg (McMahan et al. 2017, arXiv:1602.05629) and the FedOpt family (Reddi et al.
2021, "Adaptive Federated Optimization", arXiv:2003.00295) need only
sum_i w_i * delta_i and sum_i w_i, where each w_i is known from the update alone (its
token count). So the engine adds each validated update into one fp32 accumulator
(`RunningMean`) as it arrives and drops it: aggregating K updates of N bytes holds the
N-byte sum, not K x N bytes (a large update received by the gRPC server is folded
from its spill file slab by slab, `compression/slabs.py`, so not even one whole update
is held in memory). `MeanStrategy.aggregate` (a list of updates at once) runs
the same fold, so buffered and streamed rounds do the same arithmetic; only the order
of the additions follows arrival order.
"""

from __future__ import annotations

from abc import abstractmethod

import torch

from skyfed.compression.wire import TensorSpec, spec_of
from skyfed.federation.messages import Update
from skyfed.federation.strategies.base import AggregateResult, Params, Strategy


class RunningMean:
    """sum_i w_i * delta_i, folded one update at a time into fp32 accumulators."""

    def __init__(self, spec: dict[str, TensorSpec]):
        self.spec = spec
        self._acc: Params | None = None  # made by the first fold, which writes w * delta (no zero fill)
        self.weights: list[tuple[str, float]] = []  # (client, weight) in fold order

    @property
    def acc(self) -> Params:
        if self._acc is None:
            self._acc = {n: torch.zeros(s.shape, dtype=torch.float32) for n, s in self.spec.items()}
        return self._acc

    def add(self, update: Update, weight: float) -> None:
        first = self._acc is None  # 0 + w * delta is w * delta: the first fold writes it
        if first:
            self._acc = {n: torch.empty(s.shape, dtype=torch.float32) for n, s in self.spec.items()}
        fold_into = getattr(update.delta, "fold_into", None)
        if fold_into is not None:  # a `SlabDelta` (`compression/slabs.py`): slab by slab
            fold_into(self._acc, weight, first)
        else:
            for name, acc in self._acc.items():
                if first:
                    torch.mul(update.delta[name], weight, out=acc)
                else:
                    acc.add_(update.delta[name], alpha=weight)
        self.weights.append((update.client, weight))

    @property
    def total(self) -> float:
        return sum(w for _, w in self.weights)

    def mean(self) -> Params:
        """The weighted mean, computed in place: the accumulators become the result."""
        total = self.total
        if total <= 0:
            raise ValueError(f"weights must have a positive sum, got {[w for _, w in self.weights]}")
        for acc in self.acc.values():
            acc.div_(total)
        return self.acc


class MeanStrategy(Strategy):
    """A server step on the weighted mean of the deltas; the engine may fold updates into it."""

    @abstractmethod
    def weight(self, update: Update) -> float:
        """The update's (unnormalized) weight, from the update alone."""

    @abstractmethod
    def step(self, global_params: Params, mean_delta: Params, weights: dict[str, float], round: int) -> AggregateResult:
        """The new global parameters from the mean delta (which it may consume);
        `weights` are the normalized shares by client."""

    def fold(self, running: RunningMean, update: Update) -> None:
        running.add(update, self.weight(update))

    def finish(self, global_params: Params, running: RunningMean, round: int) -> AggregateResult:
        total = running.total
        mean = running.mean()
        return self.step(global_params, mean, {c: w / total for c, w in running.weights}, round)

    def aggregate(self, global_params: Params, updates: list[Update], round: int) -> AggregateResult:
        running = RunningMean(spec_of(updates[0].delta))
        for u in updates:
            self.fold(running, u)
        return self.finish(global_params, running, round)
