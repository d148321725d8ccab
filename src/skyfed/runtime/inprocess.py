"""The in-process transport: clients are objects; `send` runs the client's round at once
and queues its result; `receive` hands results back in arrival order."""

from __future__ import annotations

from collections import deque

from skyfed.federation.client import FederatedClient
from skyfed.federation.messages import ClientResult, TrainTask
from skyfed.federation.transport import Transport


class InProcessTransport(Transport):
    def __init__(self, clients: list[FederatedClient]):
        self.clients = {c.name: c for c in clients}
        self._done: deque[ClientResult] = deque()

    def client_names(self) -> list[str]:
        return list(self.clients)

    def send(self, client: str, task: TrainTask) -> None:
        self._done.append(self.clients[client].handle(task))

    def receive(self, timeout: float | None = None) -> ClientResult | None:
        return self._done.popleft() if self._done else None
