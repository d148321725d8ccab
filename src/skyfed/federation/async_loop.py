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

from skyfed.compression.payload import encode_payload
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
        self._payload: tuple[int, bytes] | None = None
        self.window = _Window()
        self.clock0 = self.transport.now()

    # ------------------------------------------------------------ sending

    def _model_payload(self) -> bytes:
        e = self.engine
        if self._payload is None or self._payload[0] != e.version:
            self._payload = (e.version, encode_payload(e.params, kind="model", round=self.sent, version=e.version))
        return self._payload[1]

    def dispatch(self, client: str) -> None:
        e = self.engine
        payload = self._model_payload()
        round_like = self.sent // len(self.clients)
        task = TrainTask(self.sent, e.version, payload, e.cfg.train.local_steps, self.strategy.client_options(round_like))
        self.in_flight[client] = _InFlight(self.sent, e.version)
        if self.strategy.needs_base_params:
            self.bases[e.version] = e.params  # params are replaced on publish, never mutated
        self.window.bytes_down[client] += len(payload)
        self.sent += 1
        self.transport.send(client, task)

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
        staleness = e.version - flight.version
        try:
            if result.base_version != flight.version:
                raise SkyfedError(f"update claims base version {result.base_version}, its task carried {flight.version}")
            update = e._decode(result, result.round)
        except SkyfedError as exc:
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
            "rejected": w.rejected,
            "train_loss": {c: float(np.mean(v)) for c, v in w.train_loss.items()},
            "val_loss": ev.loss,
            "val_ppl": ev.ppl,
            "val_token_acc": ev.token_acc,
            "bytes_up": sum(up.values()),
            "bytes_down": sum(down.values()),
            "bytes_up_by_client": up,
            "bytes_down_by_client": down,
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
            "sim_time_s": self.transport.now() - self.clock0,
        }
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
        e.on_event("round_start", {"round": self.received // n, "clients": self.clients})
        for client in self.clients:
            if self.sent < self.budget:
                self.dispatch(client)
        timeout = e.cfg.federation.round_timeout_s
        while self.received < self.budget:
            result = self.transport.receive(timeout)
            if result is None:
                log.error("no update arrived within %s s (%d of %d received); stopping", timeout, self.received, self.budget)
                break
            if not self.handle(result):
                continue
            if self.sent < self.budget:
                self.dispatch(result.client)
            self._prune_bases()
            if self.received == self.budget:
                self._flush()
            if self.received % n == 0:
                self.log_line()
                if self.received < self.budget:
                    e.on_event("round_start", {"round": self.received // n, "clients": self.clients})
        if self.received < self.budget:  # stopped early: keep what arrived
            self._flush()
            if self.window.arrivals:
                self.log_line()

    def _flush(self) -> None:
        out = self.strategy.flush(self.engine.params)
        if out is not None:
            self.publish(out)


def run_async(engine: "Engine") -> None:
    """Run the asynchronous loop to the end of the local-training budget."""
    AsyncLoop(engine).run()
