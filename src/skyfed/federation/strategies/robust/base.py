"""What the robust strategies share: a robust delta from the round's updates, then a server step."""

from __future__ import annotations

from abc import abstractmethod
from typing import Any

from skyfed.federation.messages import Update
from skyfed.federation.strategies.aggregate import apply_delta
from skyfed.federation.strategies.base import AggregateResult, Params, Strategy


class RobustStrategy(Strategy):
    """x <- x - server_lr * robust(delta_1, ..., delta_n): subclasses give `robust`."""

    server_lr: float = 1.0

    @abstractmethod
    def robust_delta(self, updates: list[Update]) -> tuple[Params, dict[str, Any]]:
        """The aggregated delta of the round's updates and the metrics to log."""

    def aggregate(self, global_params: Params, updates: list[Update], round: int) -> AggregateResult:
        delta, metrics = self.robust_delta(updates)
        return AggregateResult(apply_delta(global_params, delta, self.server_lr), metrics)
