"""The seam between the engine and the clients.

The engine sends tasks and receives results; it never knows whether the clients are
objects in this process (simulation) or processes on other clouds (gRPC). `send` does
not wait; `receive` returns the next finished result in arrival order.
"""

from __future__ import annotations

import time
from typing import Any
from abc import ABC, abstractmethod

from skyfed.federation.messages import ClientResult, TrainTask


class Transport(ABC):
    @abstractmethod
    def client_names(self) -> list[str]:
        """The clients this transport can reach, in configuration order."""

    @abstractmethod
    def send(self, client: str, task: TrainTask) -> None:
        """Dispatch a task to a client without waiting for its result."""

    @abstractmethod
    def receive(self, timeout: float | None = None) -> ClientResult | None:
        """The next result to arrive, or None when `timeout` seconds pass first.

        Seconds are on this transport's clock (`now`): simulated seconds in a
        simulation, real seconds in a deployment."""

    def reachable(self, client: str, round: int) -> bool:
        """Whether a task for `round` can be delivered to `client` now (a simulated outage
        says no); an unreachable client is sent nothing and counted as missing."""
        return True

    def release(self, result: ClientResult, rejection: str | None = None) -> None:
        """The engine is done with `result` (decoded and folded, kept, or ignored): a
        transport may now answer its sender (the gRPC one answers the push then), with
        `rejection`, the reason, when the update was refused."""

    def checkpoint_parts(self) -> dict[str, Any]:
        """Stateful parts of this transport for the run's checkpoint, by name. A part named
        "transport" promises that results in flight are restored with it."""
        return {}

    def now(self) -> float:
        """This transport's clock in seconds (real time unless simulated)."""
        return time.monotonic()

    def close(self) -> None:
        """Release connections and tell clients that training is over."""
