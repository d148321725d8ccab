"""Strategy registry: every strategy is chosen by name, with its parameters, in the YAML.

    federation:
      strategy:
        name: diloco
        params: {lr: 0.7, momentum: 0.9}

`skyfed strategies` lists them. Things a strategy needs from the runtime (not from the
YAML), such as `evaluate_params` for server-side scoring, are passed to
`build_strategy` as arguments and reach only the strategies whose constructor takes them.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable

from skyfed.errors import ConfigError
from skyfed.federation.strategies.base import AggregateResult, AsyncStrategy, Params, Strategy
from skyfed.federation.strategies.dynamic import DynamicWeighted
from skyfed.federation.strategies.fedasync import FedAsync
from skyfed.federation.strategies.fedavg import FedAvg
from skyfed.federation.strategies.fedbuff import FedBuff
from skyfed.federation.strategies.fedopt import DiLoCo, FedAdagrad, FedAdam, FedAvgM, FedOpt, FedSGD, FedYogi
from skyfed.federation.strategies.fedprox import FedProx
from skyfed.federation.strategies.params import PREFIX
from skyfed.federation.strategies.robust.centered_clip import CenteredClip
from skyfed.federation.strategies.robust.krum import Krum, MultiKrum
from skyfed.federation.strategies.robust.loss_filter import LossFilter
from skyfed.federation.strategies.robust.median import Median, TrimmedMean
from skyfed.federation.strategies.robust.norm_bound import with_norm_bound

STRATEGIES: dict[str, type[Strategy]] = {
    cls.name: cls
    for cls in [
        FedAvg, DynamicWeighted, FedOpt, DiLoCo, FedAvgM, FedAdam, FedYogi, FedAdagrad, FedSGD, FedProx, FedAsync, FedBuff,
        Median, TrimmedMean, Krum, MultiKrum, CenteredClip, LossFilter,
    ]
}

# Arguments the runtime may supply; never accepted from the YAML.
RUNTIME_ARGS = ("evaluate_params", "train_config", "total_rounds")


def yaml_params(cls: type[Strategy]) -> list[str]:
    """The parameter names a strategy accepts from `federation.strategy.params`."""
    sig = inspect.signature(cls.__init__)
    plain = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return [n for n, p in list(sig.parameters.items())[1:] if p.kind in plain and n not in RUNTIME_ARGS]


def build_strategy(
    name: str,
    params: dict[str, Any] | None = None,
    evaluate_params: Callable[[Params], float] | None = None,
    norm_bound: float | None = None,
    train_config: Any = None,
    total_rounds: int | None = None,
) -> Strategy:
    """The strategy `name` built from its YAML params (validated: a bad one names its key),
    wrapped in norm bounding when `norm_bound` (`federation.strategy.norm_bound`) is set.
    The runtime's arguments (`RUNTIME_ARGS`) reach only the constructors that take them."""
    if name not in STRATEGIES:
        raise ConfigError(f"federation.strategy.name: unknown strategy {name!r}; available: {', '.join(sorted(STRATEGIES))}")
    cls = STRATEGIES[name]
    params = dict(params or {})
    accepted = yaml_params(cls)
    for key in params:
        if key not in accepted:
            raise ConfigError(
                f"{PREFIX}.{key}: unknown parameter for {name!r}; accepted: {', '.join(accepted) or '(none)'}"
            )
    supplied = {"evaluate_params": evaluate_params, "train_config": train_config, "total_rounds": total_rounds}
    takes = inspect.signature(cls.__init__).parameters
    params.update({k: v for k, v in supplied.items() if k in takes})
    return with_norm_bound(cls(**params), norm_bound)


def needs_server_eval(name: str, params: dict[str, Any] | None) -> bool:
    """Whether this configuration scores client models on the server's validation set."""
    if name == LossFilter.name:
        return True
    return name == DynamicWeighted.name and (params or {}).get("score") == "server"


__all__ = ["AggregateResult", "AsyncStrategy", "STRATEGIES", "Strategy", "build_strategy", "needs_server_eval", "yaml_params"]
