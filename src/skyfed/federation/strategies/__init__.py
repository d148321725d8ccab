"""Strategy registry: every strategy is chosen by name, with its parameters, in the YAML."""

from __future__ import annotations

from typing import Any

from skyfed.errors import ConfigError
from skyfed.federation.strategies.base import AggregateResult, Strategy
from skyfed.federation.strategies.fedavg import FedAvg

STRATEGIES: dict[str, type[Strategy]] = {cls.name: cls for cls in [FedAvg]}


def build_strategy(name: str, params: dict[str, Any] | None = None) -> Strategy:
    if name not in STRATEGIES:
        raise ConfigError(f"federation.strategy.name: unknown strategy {name!r}; available: {', '.join(sorted(STRATEGIES))}")
    try:
        return STRATEGIES[name](**(params or {}))
    except TypeError as exc:
        raise ConfigError(f"federation.strategy.params for {name!r}: {exc}") from None


__all__ = ["AggregateResult", "STRATEGIES", "Strategy", "build_strategy"]
