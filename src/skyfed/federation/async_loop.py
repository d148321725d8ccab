"""The asynchronous event loop: clients train continuously and never wait for each other.

Used by the engine for strategies with `asynchronous = True` (FedAsync, FedBuff). It
talks to clients only through `transport.send`, `transport.receive` and
`transport.now()`, so arrival order is whatever the transport says: FIFO in a plain
in-process run, simulated completion time when the transport simulates clouds,
network order over gRPC.

    every client gets a task from the current model
    each time a result arrives:
        validate it (the engine's decode/reject path; a bad update never touches the model)
        staleness = versions published since the version its task was built from
        drop (and log) it if staleness > strategy.max_staleness
        else the strategy takes it and may publish a new version
        send that client a new task from the current model (while budget remains)

Budget: the same local training as the synchronous loop, rounds x clients tasks.
Every `len(clients)` received results (one synchronous round's worth) it evaluates,
writes a metrics.jsonl line (everything the synchronous line has, plus version and
staleness statistics) and checkpoints. Resuming restarts from the last line: tasks
in flight at the crash are sent again.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from skyfed.compression.channel import fp32_bytes
from skyfed.errors import SkyfedError
from skyfed.federation.messages import TrainTask
from skyfed.federation.strategies.base import AggregateResult, AsyncStrategy, Params
from skyfed.model import set_params

if TYPE_CHECKING:
    from skyfed.federation.engine import Engine

log = logging.getLogger(__name__)


@dataclass
class _InFlight:
    task: int  # global task number (TrainTask.round)
    version: int  # the model version the task carried


@dataclass
class _Window:
    """What happened since the last metrics line."""

    started: float = field(default_factory=time.perf_counter)
    arrivals: list[str] = field(default_factory=list)
    staleness: list[int] = field(default_factory=list)
    train_loss: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    rejected: dict[str, str] = field(default_factory=dict)
    dropped: dict[str, int] = field(default_factory=dict)
    bytes_up: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    bytes_down: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    compute_s: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    publications: list[dict[str, Any]] = field(default_factory=list)
    aggregate_s: float = 0.0
    meta: dict[str, dict[str, Any]] = field(default_factory=dict)  # ClientResult.meta (e.g. simulated timing)
    unreachable: list[str] = field(default_factory=list)
    dispatched: int = 0


class AsyncLoop:
    def __init__(self, engine: "Engine"):
        if not isinstance(engine.strategy, AsyncStrategy):
            raise SkyfedError(f"strategy {engine.strategy.name!r} is not asynchronous")
        self.engine = engine
        self.strategy: AsyncStrategy = engine.strategy
        self.transport = engine.transport
        self.clients = self.transport.client_names()
        fed = engine.cfg.federation
        self.budget = fed.rounds * len(self.clients)
        self.received = engine.next_round * len(self.clients)  # lines are written at multiples of n
        self.sent = self.received
        self.in_flight: dict[str, _InFlight] = {}
        self.bases: dict[int, Params] = {}  # versions that in-flight tasks started from
        self.idle: list[str] = []  # clients that were unreachable when due a task
        self.window = _Window()

    # ------------------------------------------------------------ sending

    def dispatch(self, client: str) -> bool:
        """Send `client` a task from the current model; False if it is unreachable now."""
        e = self.engine
        round_like = self.sent // len(self.clients)
        if not self.transport.reachable(client, round_like):
            self.idle.append(client)
            self.window.unreachable.append(client)
            return False
        # The model may have changed since the last encoding: no cached payload (the
        # downlink keeps each client's state, so a delta chain still sends only changes).
        e.downlink.settle([], [])
        payload = e.downlink.payload_for(client, e.params, self.sent, e.version)
        task = TrainTask(self.sent, e.version, payload, e.cfg.train.local_steps, self.strategy.client_options(round_like))
        self.in_flight[client] = _InFlight(self.sent, e.version)
        if self.strategy.needs_base_params:
            self.bases[e.version] = e.params  # params are replaced on publish, never mutated
        self.window.bytes_down[client] += len(payload)
        self.window.dispatched += 1
        self.sent += 1
        self.transport.send(client, task)
        return True

    def retry_idle(self) -> None:
        idle, self.idle = self.idle, []
        for client in idle:
            if self.sent < self.budget and client not in self.in_flight:
                self.dispatch(client)

    def _prune_bases(self) -> None:
        live = {f.version for f in self.in_flight.values()}
        for v in [v for v in self.bases if v not in live]:
            del self.bases[v]

    # ------------------------------------------------------------ receiving

    def publish(self, out: AggregateResult) -> None:
        e = self.engine
        e.params = {n: out.params[n].to(torch.float32).contiguous() for n in e.param_names}
        set_params(e.model, e.params)
        e.version += 1
        self.window.publications.append({"version": e.version, **out.metrics})

    def handle(self, result) -> bool:
        """Process one arrival; False when it was not one we were waiting for."""
        e = self.engine
        flight = self.in_flight.get(result.client)
        if flight is None or result.round != flight.task:
            log.warning("ignored an unexpected result from %s (task %d)", result.client, result.round)
            return False
        del self.in_flight[result.client]
        self.received += 1
        w = self.window
        w.arrivals.append(result.client)
        w.compute_s[result.client] += result.compute_s
        w.meta[result.client] = dict(result.meta)
        staleness = e.version - flight.version
        try:
            if result.base_version != flight.version:
                raise SkyfedError(f"update claims base version {result.base_version}, its task carried {flight.version}")
            update = e._decode(result, result.round)
        except SkyfedError as exc:
            e.downlink.settle([result.client], [])  # its model state is uncertain: whole model next time
            w.rejected[result.client] = str(exc)
            log.error("task %d: rejected the update from %s: %s", result.round, result.client, exc)
            return True
        w.bytes_up[result.client] += update.bytes_up
        w.train_loss[result.client].append(update.train_loss)
        w.staleness.append(staleness)
        limit = self.strategy.max_staleness
        if limit is not None and staleness > limit:
            w.dropped[result.client] = staleness
            log.warning("dropped the update from %s: staleness %d > max_staleness %d", result.client, staleness, limit)
            return True
        update.staleness = staleness
        t0 = time.perf_counter()
        out = self.strategy.on_update(e.params, update, self.bases.get(flight.version))
        if out is not None:
            self.publish(out)
        w.aggregate_s += time.perf_counter() - t0
        return True

    # ------------------------------------------------------------ metrics

    def log_line(self) -> dict[str, Any]:
        e = self.engine
        n = len(self.clients)
        r = (self.received - 1) // n
        w = self.window
        t_eval = time.perf_counter()
        ev = e.evaluator(e.model, e.cfg.eval.max_batches)
        eval_s = time.perf_counter() - t_eval
        up, down = dict(w.bytes_up), dict(w.bytes_down)
        e.totals["bytes_up"] += sum(up.values())
        e.totals["bytes_down"] += sum(down.values())
        e.next_round = r + 1
        full = fp32_bytes(e.spec)
        st = np.asarray(w.staleness, dtype=np.float64)
        weights: dict[str, float] = defaultdict(float)
        for p in w.publications:
            for c, x in p.get("weights", {}).items():
                weights[c] += x / max(1, len(w.publications))
        record = {
            "round": r,
            "version": e.version,
            "clients": list(dict.fromkeys(w.arrivals)),
            "aggregated": bool(w.publications),
            "missing": [],
            "unreachable": w.unreachable,
            "rejected": w.rejected,
            "train_loss": {c: float(np.mean(v)) for c, v in w.train_loss.items()},
            "val_loss": ev.loss,
            "val_ppl": ev.ppl,
            "val_token_acc": ev.token_acc,
            "bytes_up": sum(up.values()),
            "bytes_down": sum(down.values()),
            "bytes_up_by_client": up,
            "bytes_down_by_client": down,
            "fp32_bytes_up": len(w.staleness) * full,  # the same tensors as plain fp32
            "fp32_bytes_down": w.dispatched * full,
            "cum_bytes_up": e.totals["bytes_up"],
            "cum_bytes_down": e.totals["bytes_down"],
            "compute_s": dict(w.compute_s),
            "aggregate_s": w.aggregate_s,
            "eval_s": eval_s,
            "wall_time_s": time.perf_counter() - w.started,
            "elapsed_s": e.elapsed_s(),
            "mode": "async",
            "updates": self.received,
            "arrivals": w.arrivals,
            "staleness": {
                "mean": float(st.mean()) if st.size else None,
                "max": int(st.max()) if st.size else None,
                "values": [int(x) for x in w.staleness],
            },
            "dropped": w.dropped,
            "publications": len(w.publications),
            "weights": dict(weights),
            "strategy_metrics": w.publications,
            "sim_time_s": self.transport.now(),  # the transport's clock (simulated in simulation)
        }
        from skyfed.federation.engine import RoundOutcome

        outcome = RoundOutcome(rejected=w.rejected, compute_s=dict(w.compute_s), meta=w.meta)
        for obs in e.observers:  # e.g. simulated time and egress cost of the clouds
            record.update(obs.round_end(r, record, outcome))
        e.run_dir.append_metrics(record)
        e.save()
        e.on_event("round_end", record)
        self.window = _Window()
        return record

    # ------------------------------------------------------------ loop

    def run(self) -> None:
        e = self.engine
        n = len(self.clients)
        if self.received >= self.budget:
            return
        self._window_start(self.received // n)
        for client in self.clients:
            if self.sent < self.budget:
                self.dispatch(client)
        timeout = e.cfg.federation.round_timeout_s
        while self.received < self.budget:
            if not self.in_flight:
                self.retry_idle()
                if not self.in_flight:
                    log.error("no client is reachable (%d of %d updates received); stopping", self.received, self.budget)
                    break
            result = self.transport.receive(timeout)
            if result is None:
                log.error("no update arrived within %s s (%d of %d received); stopping", timeout, self.received, self.budget)
                break
            handled = self.handle(result)
            self.transport.release(result)
            if not handled:
                continue
            if self.sent < self.budget:
                self.dispatch(result.client)
            self._prune_bases()
            if self.received == self.budget:
                self._flush()
            if self.received % n == 0:
                self.log_line()
                if self.received < self.budget:
                    self._window_start(self.received // n)
                    self.retry_idle()
        if self.received < self.budget:  # stopped early: keep what arrived
            self._flush()
            if self.window.arrivals:
                self.log_line()

    def _window_start(self, r: int) -> None:
        self.engine.on_event("round_start", {"round": r, "clients": self.clients})
        for obs in self.engine.observers:
            obs.round_start(r)

    def _flush(self) -> None:
        out = self.strategy.flush(self.engine.params)
        if out is not None:
            self.publish(out)


def run_async(engine: "Engine") -> None:
    """Run the asynchronous loop to the end of the local-training budget."""
    AsyncLoop(engine).run()
