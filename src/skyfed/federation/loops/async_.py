"""The asynchronous event loop: clients train continuously and never wait for each other.

Used for strategies with `asynchronous = True` (FedAsync, Xie et al. 2019; FedBuff,
Nguyen et al. 2022). It talks to clients only through `transport.send`,
`transport.receive` and `transport.now()`, so arrival order is whatever the transport
says: FIFO in a plain in-process run, simulated completion time when the transport
simulates clouds, network order over gRPC. It changes the model only through the
server core's public methods (`task`, `accept`, `publish`, `settle`).

    every client gets a task from the current model
    each time a result arrives:
        the core validates it (a bad update never touches the model)
        staleness = versions published since the version its task was built from
        drop (and log) it if staleness > strategy.max_staleness
        else the strategy takes it and may publish a new version
        send that client a new task from the current model (while budget remains)

Budget: the local steps of the synchronous loop with equal steps, rounds x clients x
train.local_steps (`skyfed.federation.steps`); each task has its client's own steps
(`federation.steps_by_speed`, `clients[].local_steps`), the last ones cut to what is
left. Every time the received steps pass one synchronous round's worth (clients x
train.local_steps) the window closer evaluates, writes a metrics.jsonl line (plus
version and staleness statistics) and checkpoints. The checkpoint holds the tasks in
flight; a transport that restored its own queue (the simulation) continues exactly, any
other (gRPC) sends them again.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import numpy as np

from skyfed.config import ExperimentConfig
from skyfed.errors import SkyfedError
from skyfed.federation.messages import ClientResult
from skyfed.federation.server import Rejection, ServerCore
from skyfed.federation.steps import step_budget
from skyfed.federation.strategies.base import AggregateResult, AsyncStrategy, Params
from skyfed.federation.transport import Transport
from skyfed.federation.window import Window, WindowCloser

log = logging.getLogger(__name__)


@dataclass
class InFlight:
    task: int  # global task number (TrainTask.round)
    version: int  # the model version the task carried
    steps: int  # its local steps


class AsyncLoop:
    def __init__(self, core: ServerCore, transport: Transport, closer: WindowCloser, cfg: ExperimentConfig):
        if not isinstance(core.strategy, AsyncStrategy):
            raise SkyfedError(f"strategy {core.strategy.name!r} is not asynchronous")
        self.core = core
        self.strategy: AsyncStrategy = core.strategy
        self.transport = transport
        self.closer = closer
        self.cfg = cfg
        self.clients = transport.client_names()
        self.budget = step_budget(cfg)  # local steps
        self.window_steps = len(self.clients) * cfg.train.local_steps  # one synchronous round's worth
        self.received = 0  # results
        self.sent = 0  # tasks (the next task's number)
        self.received_steps = 0
        self.sent_steps = 0
        self.in_flight: dict[str, InFlight] = {}
        self.bases: dict[int, Params] = {}  # versions that in-flight tasks started from
        self.idle: list[str] = []  # clients that were unreachable when due a task
        self.resend = False  # after a resume whose transport lost the tasks in flight
        self.window: Window | None = None
        self.publications: list[dict[str, Any]] = []
        self.staleness: list[int] = []
        self.dropped: dict[str, int] = {}
        self.arrivals: list[str] = []

    @property
    def next_round(self) -> int:
        return self.received_steps // self.window_steps

    # ------------------------------------------------------------ sending

    def dispatch(self, client: str) -> bool:
        """Send `client` a task from the current model; False if it is unreachable now."""
        core, w = self.core, self.window
        round_like = self.sent_steps // self.window_steps
        if not self.transport.reachable(client, round_like):
            self.idle.append(client)
            w.unreachable.append(client)
            return False
        core.settle([], [])  # the model may have changed since the last encoding
        steps = min(core.local_steps.get(client, self.cfg.train.local_steps), self.budget - self.sent_steps)
        task = core.task(client, self.sent, steps, self.strategy.client_options(round_like))
        self.in_flight[client] = InFlight(self.sent, core.version, steps)
        if self.strategy.needs_base_params:
            self.bases[core.version] = core.params  # replaced on publish, never changed in place
        w.bytes_down[client] += len(task.payload)
        w.dispatched += 1
        w.fp32_down += core.fp32_bytes(client)
        self.sent += 1
        self.sent_steps += steps
        self.transport.send(client, task)
        return True

    def retry_idle(self) -> None:
        idle, self.idle = self.idle, []
        for client in idle:
            if self.sent_steps < self.budget and client not in self.in_flight:
                self.dispatch(client)

    def _prune_bases(self) -> None:
        live = {f.version for f in self.in_flight.values()}
        for v in [v for v in self.bases if v not in live]:
            del self.bases[v]

    # ------------------------------------------------------------ receiving

    def publish(self, out: AggregateResult) -> None:
        try:
            self.core.publish(out)
        except SkyfedError as exc:
            log.error("%s", exc)
            self.window.extra.setdefault("aggregate_errors", []).append(str(exc))
            return
        self.publications.append({"version": self.core.version, **out.metrics})

    def handle(self, result: ClientResult) -> bool:
        """Process one arrival; False when it was not one we were waiting for."""
        core, w = self.core, self.window
        flight = self.in_flight.get(result.client)
        if flight is None or result.round != flight.task:
            log.warning("ignored an unexpected result from %s (task %d)", result.client, result.round)
            result.payload = None
            self.transport.release(result, f"task {result.round} is not open for {result.client}")
            return False
        del self.in_flight[result.client]
        self.received += 1
        self.received_steps += flight.steps
        self.arrivals.append(result.client)
        w.compute_s[result.client] += result.compute_s
        w.meta[result.client] = dict(result.meta)
        staleness = core.version - flight.version
        got = core.accept(result, flight.task, flight.version, flight.steps)
        result.payload = None
        if isinstance(got, Rejection):
            core.settle([result.client], [])  # its model state is uncertain: whole model next time
            w.rejected[result.client] = got.reason
            log.error("task %d: rejected the update from %s: %s", result.round, result.client, got.reason)
            self.transport.release(result, got.reason)
            return True
        self.transport.release(result)
        w.decoded += 1
        w.fp32_up += core.fp32_bytes(result.client)
        w.bytes_up[result.client] += got.bytes_up
        w.train_loss[result.client].append(got.train_loss)
        self.staleness.append(staleness)
        limit = self.strategy.max_staleness
        if limit is not None and staleness > limit:
            self.dropped[result.client] = staleness
            log.warning("dropped the update from %s: staleness %d > max_staleness %d", result.client, staleness, limit)
            return True
        w.accepted.append(result.client)
        got.staleness = staleness
        t0 = time.perf_counter()
        out = self.strategy.on_update(core.params, got, self.bases.get(flight.version))
        if out is not None:
            self.publish(out)
        w.aggregate_s += time.perf_counter() - t0
        return True

    # ------------------------------------------------------------ windows

    def _open(self) -> None:
        self.window = self.closer.open(self.next_round, self.clients)
        self.publications, self.staleness, self.dropped, self.arrivals = [], [], {}, []

    def _close(self) -> dict[str, Any]:
        w = self.window
        st = np.asarray(self.staleness, dtype=np.float64)
        weights: dict[str, float] = defaultdict(float)
        for p in self.publications:
            for c, x in p.get("weights", {}).items():
                weights[c] += x / max(1, len(self.publications))
        w.clients = list(dict.fromkeys(self.arrivals))
        w.aggregated = bool(self.publications)
        w.extra.update({
            "mode": "async",
            "updates": self.received,
            "local_steps_done": self.received_steps,  # of the budget's `local_steps_budget`
            "local_steps_budget": self.budget,
            "arrivals": self.arrivals,
            "staleness": {
                "mean": float(st.mean()) if st.size else None,
                "max": int(st.max()) if st.size else None,
                "values": [int(x) for x in self.staleness],
            },
            "dropped": self.dropped,
            "publications": len(self.publications),
            "weights": dict(weights),
            "strategy_metrics": self.publications,
            "sim_time_s": self.transport.now(),  # the transport's clock (simulated in simulation)
        })
        return self.closer.close(w)

    # ------------------------------------------------------------ loop

    def run(self) -> None:
        if self.received_steps >= self.budget:
            return
        self._open()
        if self.received == 0 or self.resend:  # a fresh start, or tasks lost with the transport
            self.in_flight, self.bases, self.idle, self.sent, self.resend = {}, {}, [], self.received, False
            self.sent_steps = self.received_steps
            for client in self.clients:
                if self.sent_steps < self.budget:
                    self.dispatch(client)
        else:  # resumed with the transport's queue: continue exactly where the window closed
            self.retry_idle()
        timeout = self.cfg.federation.round_timeout_s
        while self.received_steps < self.budget:
            if not self.in_flight:
                self.retry_idle()
                if not self.in_flight:
                    log.error("no client is reachable (%d of %d local steps received); stopping",
                              self.received_steps, self.budget)
                    break
            result = self.transport.receive(timeout)
            if result is None:
                log.error("no update arrived within %s s (%d of %d local steps received); stopping",
                          timeout, self.received_steps, self.budget)
                break
            window = self.next_round
            if not self.handle(result):
                continue
            if self.sent_steps < self.budget:
                self.dispatch(result.client)
            self._prune_bases()
            if self.received_steps == self.budget:
                self._flush()
            if self.next_round > window:  # one synchronous round's worth of steps arrived
                self._close()
                if self.received_steps < self.budget:
                    self._open()
                    self.retry_idle()
        if self.received_steps < self.budget:  # stopped early: keep what arrived
            self._flush()
            if self.arrivals:
                self._close()

    def _flush(self) -> None:
        out = self.strategy.flush(self.core.params)
        if out is not None:
            self.publish(out)

    # ------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        return {
            "received": self.received,
            "sent": self.sent,
            "received_steps": self.received_steps,
            "sent_steps": self.sent_steps,
            "in_flight": {c: (f.task, f.version, f.steps) for c, f in self.in_flight.items()},
            "bases": self.bases,
            "idle": list(self.idle),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.received, self.sent = int(state["received"]), int(state["sent"])
        steps = self.cfg.train.local_steps  # a checkpoint from before per-client steps: all tasks had these
        self.received_steps = int(state.get("received_steps", self.received * steps))
        self.sent_steps = int(state.get("sent_steps", self.sent * steps))
        self.in_flight = {c: InFlight(*flight) if len(flight) == 3 else InFlight(*flight, steps)
                          for c, flight in state["in_flight"].items()}
        self.bases = dict(state["bases"])
        self.idle = list(state["idle"])
