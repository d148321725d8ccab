"""The strategy interface: how client updates become the next global model.

The engine owns the round loop and passes a strategy everything it needs as
arguments (unlike Flower's `FedOpt.current_arrays`, nothing must be set beforehand).
State that must survive a restart (server optimizer moments, momentum buffers) is
returned by `state_dict()` and goes into every checkpoint.
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
