"""The in-process transport: clients are objects, time is a simulated clock.

`send(client, task)` runs the client's task at once, for real, and schedules its result
to arrive at `now + download + compute + upload` simulated seconds, as the client's
cloud profile says (`skyfed.clouds.CloudNetwork`); a client busy with an earlier task
starts the new one when it is free. `receive(timeout)` pops the earliest arrival and
moves the clock to it, or moves the clock by `timeout` when nothing arrives sooner.
`elapse(seconds)` moves it for server work (aggregation). The transport knows nothing
of rounds: synchronous and asynchronous engines both drive it.

Without a network every transfer and computation takes zero simulated time and
results arrive in the order they were sent.

The clients are `FederatedClient`s that each keep their model and state in memory
(`simulation.client_state: memory`), or `skyfed.runtime.replica.ReplicaClient`s that
share one model replica and keep their state in files (`disk`, the default): then the
transport's `files` (skyfed.runtime.client_state.ClientStateFiles) says which file
holds each client's state, and a checkpoint names those files instead of holding the
states. The results waiting for their simulated arrival then also keep their update's
bytes in a file (RUN_DIR/clients/updates/SEQ.update, deleted when it is received), so
that one update at a time is in memory however many clients answer a round; a
checkpoint holds them inline, as before.

`skyfed.runtime.ray.RayTransport` trains the clients in Ray actors and schedules their
results with the same code, so the clock and the bill are the same.
"""

from __future__ import annotations

import dataclasses
import heapq
import logging
from pathlib import Path

from skyfed.clouds import CloudNetwork, Timing
from skyfed.federation.client import FederatedClient
from skyfed.federation.messages import ClientResult, TrainTask
from skyfed.federation.transport import Transport
from skyfed.runtime.client_state import ClientStateFiles

log = logging.getLogger(__name__)


class SimulatedTransport(Transport):
    def __init__(
        self, clients: list[FederatedClient], network: CloudNetwork | None = None, start_s: float = 0.0,
        files: ClientStateFiles | None = None, spill_updates: bool = True,
    ):
        self.clients = {c.name: c for c in clients}
        self.files = files  # where the clients' states are, when they are not in the clients
        self.spill_updates = spill_updates  # with `files`: updates in flight wait in files too
        self._spilled: dict[int, Path] = {}  # seq -> the file holding that result's payload
        self.network = network
        self._now = start_s
        self._seq = 0  # ties in arrival time keep send order
        self._queue: list[tuple[float, int, ClientResult]] = []
        self._busy_until: dict[str, float] = {}

    def client_names(self) -> list[str]:
        return list(self.clients)

    def now(self) -> float:
        return self._now

    def elapse(self, seconds: float) -> None:
        """Server-side work (e.g. aggregation) of `seconds` moves the simulated clock."""
        self._now += max(0.0, seconds)

    def reachable(self, client: str, round: int) -> bool:
        if self.network is None:
            return True
        reason = self.network.unavailable_reason(client, round)
        if reason is not None:
            log.warning("round %d: %s is unreachable: %s", round, client, reason)
        return reason is None

    def send(self, client: str, task: TrainTask) -> None:
        self._schedule(client, task, self.clients[client].handle(task), self._now)

    def _schedule(self, client: str, task: TrainTask, result: ClientResult, sent_s: float) -> None:
        """Queue `result` for arrival after its simulated download, compute and upload,
        starting at `sent_s` or when the client is free; bills the transfers."""
        arrival = sent_s
        net = self.network
        if net is not None:
            start = max(sent_s, self._busy_until.get(client, 0.0))
            up_bytes = len(result.payload) if result.payload is not None else 0
            timing = Timing(
                download_s=net.download_s(client, len(task.payload)),
                compute_s=net.compute_s(client, result.num_tokens),
                upload_s=net.upload_s(client, up_bytes),
                start_s=start,
            )
            net.bill_download(client, len(task.payload))
            net.bill_upload(client, up_bytes)  # billed when sent, even if it arrives too late
            arrival = start + timing.total_s
            self._busy_until[client] = arrival
            result.meta["timing"] = {**timing.as_dict(), "cloud": net.client_cloud[client]}
        self._spill(result)
        heapq.heappush(self._queue, (arrival, self._seq, result))
        self._seq += 1

    def _spill_dir(self) -> Path | None:
        return self.files.root / "updates" if self.files is not None and self.spill_updates else None

    def _spill(self, result: ClientResult) -> None:
        """Move the payload of the result about to be queued (number `self._seq`) to a file."""
        folder = self._spill_dir()
        if folder is None or result.payload is None:
            return
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{self._seq}.update"
        path.write_bytes(result.payload)
        result.payload = None
        self._spilled[self._seq] = path

    def _unspilled(self, seq: int, result: ClientResult, remove: bool) -> ClientResult:
        """`result` with its payload back (the same object when `remove`, else a copy)."""
        path = self._spilled.get(seq)
        if path is None:
            return result
        payload = path.read_bytes()
        if not remove:
            return dataclasses.replace(result, payload=payload)
        del self._spilled[seq]
        path.unlink(missing_ok=True)
        result.payload = payload
        return result

    def settle(self) -> None:
        """Schedule (and bill) every result sent so far; `send` already did it here."""

    def receive(self, timeout: float | None = None) -> ClientResult | None:
        if self._queue and (timeout is None or self._queue[0][0] <= self._now + timeout):
            arrival, seq, result = heapq.heappop(self._queue)
            self._now = max(self._now, arrival)
            return self._unspilled(seq, result, remove=True)
        if timeout is not None:
            self._now += timeout
        return None

    def in_flight(self) -> int:
        """Results sent but not yet received."""
        return len(self._queue)

    def checkpoint_parts(self) -> dict:
        return {"transport": self}

    def state_dict(self) -> dict:
        """The clock, the results still travelling, each client's state (or the files that
        hold them) and the egress bill: a resumed simulation continues exactly."""
        self.settle()
        return {
            "now": self._now,
            "seq": self._seq,
            "queue": [(a, seq, self._unspilled(seq, r, remove=False)) for a, seq, r in self._queue],
            "busy_until": dict(self._busy_until),
            "clients": {name: c.state_dict() for name, c in self.clients.items()} if self.files is None else {},
            "client_files": self.files.state_dict() if self.files is not None else None,
            "network": self.network.state_dict() if self.network is not None else None,
        }

    def load_state_dict(self, state: dict) -> None:
        self._now, self._seq, self._busy_until = state["now"], state["seq"], dict(state["busy_until"])
        self._queue = list(state["queue"])  # payloads inline
        heapq.heapify(self._queue)
        self._spilled = {}
        folder = self._spill_dir()
        if folder is not None and folder.is_dir():  # written after the checkpoint
            for stale in folder.glob("*.update"):
                stale.unlink(missing_ok=True)
        if self.files is not None:
            self.files.load_state_dict(state.get("client_files") or {})
        else:
            for name, client_state in state["clients"].items():
                self.clients[name].load_state_dict(client_state)
        if self.network is not None and state["network"] is not None:
            self.network.load_state_dict(state["network"])


InProcessTransport = SimulatedTransport  # the name the foundation used
