"""FedBuff under secure aggregation: one secure sum per buffer.

FedBuff (Nguyen et al. 2022, arXiv:2106.06639) applies a buffer of K asynchronous
updates at a time; secure aggregation (Bonawitz et al. 2017, `security/secagg/`) lets
the server see only their sum. The masks of a session can only be agreed among clients
known before any of them masks, so here a buffer is a *cohort*: K distinct clients that
run the set-up (keys, shares) together and are then sent their training tasks together,
from one model version v0, all with the same task number.

    free clients (not in an unfinished cohort) join the forming cohort
    when it has K members (or when nothing else is in flight, the free ones, >= 2):
        keys and shares among them; those that finish set-up train from v0
    each masked update is folded into its cohort's ring sum as it arrives
    a cohort whose members have all answered (or whose `round_timeout_s` since dispatch
    has passed) is unmasked with its survivors' shares, and FedBuff applies it:
        x <- x - lr * s(tau) * sum_i n_i delta_i / sum_i n_i,   tau = versions since v0
    (every member has the same staleness tau, so s(tau) weights the unmasked mean);
    its members are free again

Cohorts overlap: while one trains, the next forms from the clients that are free, so
fast clients do not wait for slow ones of another cohort, but a client waits for its
own cohort to be unmasked before it starts again. Results that arrive while another
cohort's stage runs are kept and handled after it (`SecAggCoordinator.on_other`). A
cohort with too few survivors, or staler than `max_staleness`, is refused (one log
line) and the model is unchanged. Budget and windows are the asynchronous loop's:
rounds x clients tasks, a metrics line every `len(clients)` finished tasks. A resumed
run drops the cohorts that were in flight (their protocol state is not checkpointed)
and sends their tasks again.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from skyfed.config import ExperimentConfig
from skyfed.errors import SecAggError, SkyfedError
from skyfed.federation.messages import ClientResult
from skyfed.federation.server import ServerCore
from skyfed.federation.transport import Transport
from skyfed.federation.window import Window, WindowCloser
from skyfed.security.secagg.coordinator import SecAggCoordinator
from skyfed.security.secagg.simulated import settings_from_config

log = logging.getLogger(__name__)


@dataclass
class Cohort:
    task: int  # the task number every member's tasks carry (TrainTask.round)
    version: int  # v0: the model version its members train from
    members: list[str]
    coordinator: SecAggCoordinator
    deadline: float | None = None
    waiting: set[str] = field(default_factory=set)  # members whose masked update has not arrived


class SecureBufferLoop:
    def __init__(self, core: ServerCore, transport: Transport, closer: WindowCloser, cfg: ExperimentConfig):
        self.core = core
        self.strategy = core.strategy  # FedBuff (compat refuses every other asynchronous strategy)
        self.transport = transport
        self.closer = closer
        self.cfg = cfg
        self.clients = transport.client_names()
        self.size = min(int(self.strategy.buffer_size), len(self.clients))
        self.budget = cfg.federation.rounds * len(self.clients)
        self.received = 0  # tasks finished: a masked update arrived, or its client dropped out
        self.sent = 0
        self.settings = settings_from_config(cfg.security.secagg)
        tc = cfg.train
        self.max_tokens = tc.local_steps * tc.batch_size * tc.seq_len
        self.cohorts: list[Cohort] = []
        self.free: deque[str] = deque()
        self.later: deque[ClientResult] = deque()  # results that arrived during another cohort's stage
        self.window: Window | None = None
        self.windows = 0

    @property
    def next_round(self) -> int:
        return self.received // len(self.clients)

    # ------------------------------------------------------------ cohorts

    def _member_of(self, client: str) -> bool:
        return any(client in c.members for c in self.cohorts)

    def _form(self) -> bool:
        """Start one cohort from the free clients if it is time; False if none started."""
        left = self.budget - self.sent
        want = min(self.size, left)
        if want < 2 or (len(self.free) < want and (self.cohorts or len(self.free) < 2)):
            return False
        round_like = self.sent // len(self.clients)
        members, skipped = [], []
        while self.free and len(members) < want:
            client = self.free.popleft()
            (members if self.transport.reachable(client, round_like) else skipped).append(client)
        self.free.extend(skipped)
        self.window.unreachable.extend(c for c in skipped if c not in self.window.unreachable)
        if len(members) < 2:
            self.free.extendleft(reversed(members))
            return False
        self._start(members)
        return True

    def _start(self, members: list[str]) -> None:
        core, w = self.core, self.window
        task_no = self.sent
        self.sent += len(members)
        coord = SecAggCoordinator(core.spec, self.settings, self.max_tokens, self.cfg.federation.round_timeout_s,
                                  self.cfg.federation.max_update_bytes, on_other=self.later.append)
        cohort = Cohort(task_no, core.version, members, coord)
        self.cohorts.append(cohort)
        try:
            extra = coord.setup(self.transport, members, task_no, core.version)
        except SecAggError as exc:
            log.error("buffer of task %d: secure aggregation set-up refused: %s; the global model is unchanged", task_no, exc)
            w.extra.setdefault("aggregate_errors", []).append(str(exc))
            w.missing.extend(members)
            self.received += len(members)  # their tasks are over
            self._end(cohort, [])
            return
        core.settle([], [])  # the model may have changed since the last encoding
        options = self.strategy.client_options(task_no // len(self.clients))
        for client in members:
            if client not in extra:  # dropped out during set-up
                w.missing.append(client)
                continue
            task = core.task(client, task_no, self.cfg.train.local_steps, {**options, **extra[client]})
            w.bytes_down[client] += len(task.payload)
            w.dispatched += 1
            cohort.waiting.add(client)
            self.transport.send(client, task)
        timeout = self.cfg.federation.round_timeout_s
        cohort.deadline = None if timeout is None else self.transport.now() + timeout
        self.received += len(members) - len(cohort.waiting)  # the set-up dropouts' tasks are over
        if not cohort.waiting:
            self._end(cohort, [])

    def _handle(self, result: ClientResult) -> None:
        """A masked update (or a dropout) for its cohort; anything else is ignored."""
        w = self.window
        cohort = next((c for c in self.cohorts if result.client in c.waiting and result.round == c.task), None)
        if cohort is None:
            log.warning("ignored an unexpected result from %s (task %d)", result.client, result.round)
            result.payload = None
            self.transport.release(result, f"task {result.round} is not open for {result.client}")
            return
        cohort.waiting.discard(result.client)
        self.received += 1
        w.compute_s[result.client] += result.compute_s
        w.meta[result.client] = dict(result.meta)
        nbytes = len(result.payload) if result.payload is not None else 0
        if cohort.coordinator.accept(result):
            w.decoded += 1
            w.bytes_up[result.client] += nbytes
            w.train_loss[result.client].append(result.train_loss)
            self.transport.release(result)
        else:
            w.rejected[result.client] = result.error or "masked update refused"
            self.transport.release(result, w.rejected[result.client])
        result.payload = None
        if not cohort.waiting:
            self._finish(cohort)

    def _finish(self, cohort: Cohort) -> None:
        """Unmask the cohort's sum and let FedBuff apply it (or refuse it, model unchanged)."""
        core, w = self.core, self.window
        if cohort.waiting:
            log.warning("buffer of task %d: no update from %s", cohort.task, ", ".join(sorted(cohort.waiting)))
            w.missing.extend(sorted(cohort.waiting))
            self.received += len(cohort.waiting)
            cohort.waiting.clear()
        staleness = core.version - cohort.version
        limit = self.strategy.max_staleness
        t0 = time.perf_counter()
        try:
            if limit is not None and staleness > limit:
                raise SecAggError(f"the buffer's staleness {staleness} > max_staleness {limit}; it is dropped")
            outcome = cohort.coordinator.finish(self.transport, cohort.task, core.version)
            out = self.strategy.apply_secure(core.params, outcome.update, staleness, outcome.tokens)
            core.publish(out)
        except SkyfedError as exc:
            log.error("buffer of task %d: secure aggregation refused: %s; the global model is unchanged", cohort.task, exc)
            w.extra.setdefault("aggregate_errors", []).append(str(exc))
            self._end(cohort, [])
            return
        finally:
            w.aggregate_s += time.perf_counter() - t0
        w.accepted.extend(outcome.survivors)
        w.extra.setdefault("publications_detail", []).append(
            {"version": core.version, "task": cohort.task, "staleness": staleness, "survivors": outcome.survivors,
             "dropped": outcome.dropped, **out.metrics})
        self._end(cohort, outcome.survivors)

    def _end(self, cohort: Cohort, survivors: list[str]) -> None:
        w = self.window
        for client, n in cohort.coordinator.bytes_up.items():
            w.bytes_up[client] += n
        for client, n in cohort.coordinator.bytes_down.items():
            w.bytes_down[client] += n
        w.extra["secagg_bytes_up"] = w.extra.get("secagg_bytes_up", 0) + sum(cohort.coordinator.bytes_up.values())
        w.extra["secagg_bytes_down"] = w.extra.get("secagg_bytes_down", 0) + sum(cohort.coordinator.bytes_down.values())
        self.core.settle(cohort.members, survivors)
        self.cohorts.remove(cohort)
        self.free.extend(cohort.members)
        while self.window is not None and self.received >= (self.windows + 1) * len(self.clients):
            self._close()
            if self.received < self.budget:
                self._open()

    def _expire(self, everything: bool = False) -> None:
        """Unmask the cohorts past their deadline (`everything`: all of them, when nothing
        more can arrive) with the members that answered."""
        now = self.transport.now()
        for cohort in [c for c in self.cohorts if c.waiting and (everything or (c.deadline is not None and now >= c.deadline))]:
            self._finish(cohort)

    # ------------------------------------------------------------ windows

    def _open(self) -> None:
        self.window = self.closer.open(self.windows, self.clients)

    def _close(self) -> None:
        w = self.window
        details = w.extra.pop("publications_detail", [])
        w.round = self.windows
        w.aggregated = bool(details)
        w.extra.update({
            "mode": "async",
            "updates": self.received,
            "publications": len(details),
            "staleness": {"values": [d["staleness"] for d in details]},
            "secure_aggregation": [{k: d[k] for k in ("task", "survivors", "dropped", "staleness")} for d in details],
            "strategy_metrics": details,
            "sim_time_s": self.transport.now(),
        })
        self.windows += 1
        self.window = None
        self.closer.close(w)

    # ------------------------------------------------------------ loop

    def run(self) -> None:
        if self.received >= self.budget:
            return
        self.sent, self.cohorts, self.later = self.received, [], deque()  # a resume sends in-flight tasks again
        self.windows = self.received // len(self.clients)
        self.free = deque(self.clients)
        self._open()
        while self.received < self.budget:
            while self._form():
                pass
            if not self.cohorts:
                log.error("no buffer can start (%d of %d tasks done, %d clients free); stopping",
                          self.received, self.budget, len(self.free))
                break
            if self.later:
                self._handle(self.later.popleft())
                continue
            deadlines = [c.deadline for c in self.cohorts if c.deadline is not None]
            timeout = None if not deadlines else max(0.0, min(deadlines) - self.transport.now())
            result = self.transport.receive(timeout)
            if result is None:
                self._expire(everything=timeout is None)  # None without a timeout: nothing is on its way
            else:
                self._handle(result)
        if self.window is not None and (self.window.accepted or self.window.missing or self.window.rejected):
            self._close()

    # ------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        return {"received": self.received}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.received = int(state["received"])
