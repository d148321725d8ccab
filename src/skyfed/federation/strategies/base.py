"""The strategy interface: how client updates become the next global model.

The engine owns the round loop and passes a strategy everything it needs as
arguments (unlike Flower's `FedOpt.current_arrays`, nothing must be set beforehand).
State that must survive a restart (server optimizer moments, momentum buffers, an
asynchronous buffer) is returned by `state_dict()` and goes into every checkpoint.

Synchronous strategies implement `aggregate` (all of a round's updates at once).
Asynchronous ones (`AsyncStrategy`) implement `on_update`: the engine's event loop
(`skyfed.federation.loops.async_`) hands them each update as it arrives, with its
staleness, and they decide whether to publish a new global version.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from skyfed.federation.messages import Update

Params = dict[str, torch.Tensor]


@dataclass
class AggregateResult:
    params: Params  # the new global parameters
    metrics: dict[str, Any] = field(default_factory=dict)  # e.g. per-client weights


class Strategy(ABC):
    name: ClassVar[str]
    description: ClassVar[str]  # one line for `skyfed strategies`
    paper: ClassVar[str]  # the citation
    asynchronous: ClassVar[bool] = False

    def client_options(self, round: int) -> dict[str, Any]:
        """Extras sent with each task (e.g. FedProx's mu)."""
        return {}

    @abstractmethod
    def aggregate(self, global_params: Params, updates: list[Update], round: int) -> AggregateResult:
        """Combine validated updates into new global parameters (never in place)."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class AsyncStrategy(Strategy):
    """A strategy fed one update at a time by the asynchronous event loop."""

    asynchronous: ClassVar[bool] = True
    # True when `on_update` needs the model the update was trained from (the loop then
    # keeps the versions that in-flight tasks started from).
    needs_base_params: bool = False
    max_staleness: int | None = None  # the loop drops (and logs) older updates

    @abstractmethod
    def on_update(self, global_params: Params, update: Update, base_params: Params | None) -> AggregateResult | None:
        """Take one update (`update.staleness` is set); return new params to publish, or None."""

    def flush(self, global_params: Params) -> AggregateResult | None:
        """At the end of training: apply anything still held back (e.g. a partial buffer)."""
        return None

    def aggregate(self, global_params: Params, updates: list[Update], round: int) -> AggregateResult:
        """Synchronous use: every update is fresh (staleness 0, based on `global_params`)."""
        base = global_params
        params, metrics = global_params, {}
        for u in updates:
            u.staleness = 0
            out = self.on_update(params, u, base)
            if out is not None:
                params, metrics = out.params, {**metrics, **out.metrics}
        out = self.flush(params)
        if out is not None:
            params, metrics = out.params, {**metrics, **out.metrics}
        return AggregateResult(params, metrics)
