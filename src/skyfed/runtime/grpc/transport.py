"""`GrpcTransport`: the engine's side of a gRPC deployment.

The engine calls `send` (queue a task for a client) and `receive(timeout)` (the next
update, real seconds) exactly as it does in simulation; the gRPC servicer threads call
`next_task` and `submit` when clients pull tasks and push updates. Everything is
guarded by one condition variable.

Synchronous-mode rules (enforced in `submit`):

- a client has at most one open task, the latest one sent; a new round's task
  replaces an unfinished older one, so a restarted client never trains a stale round;
- an update is accepted only for the client's open round and built on the model
  version it was sent; one for a past (or future) round, or another base version, is
  refused with `RoundClosedError`;
- the same (client, round, stage) is accepted once; a second push is refused with
  `AlreadyReceivedError` (the first, or its refusal, stands).

The stage is "update" except for secure aggregation's control messages ("keys",
"shares", "unmask"; `stage_of`): the coordinator sends them as tasks of the same round,
one at a time, and the answer to each is accepted only while that stage's task is the
client's open one.

Backpressure: the servicer answers a push only once the engine has released the update
(`release`: validated and taken into the round, or rejected with a reason that
`wait_released` hands to the servicer for the client), or after `wait_released`'s
timeout. The server holds the running aggregate, the update being folded and the
uploads in flight, never a queue of received updates; an upload of at least
`spill_min_bytes` (`federation.spill_min_bytes`) waits in a temporary file, not in
memory (`receive_buffer`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field

from skyfed.compression.spill import SpillWriter
from skyfed.errors import SkyfedError
from skyfed.federation.messages import ClientResult, TrainTask
from skyfed.federation.transport import Transport
from skyfed.runtime.grpc.chunks import Assembler

log = logging.getLogger(__name__)


class RoundClosedError(SkyfedError):
    """An update for a round that is not open for this client."""


class AlreadyReceivedError(SkyfedError):
    """A second update from the same client for the same round."""


@dataclass(frozen=True)
class Verdict:
    """What became of a pushed update: released by the engine (folded, or rejected with a
    reason) or still held when the wait ended."""

    released: bool
    rejection: str | None = None


@dataclass
class ClientRecord:
    """What the server knows about one configured client."""

    name: str
    index: int
    num_tokens: int = 0
    session: str | None = None
    registrations: int = 0
    last_seen: float = 0.0
    told_done: bool = False
    rounds_submitted: list[int] = field(default_factory=list)

    @property
    def ready(self) -> bool:
        return self.session is not None and self.num_tokens > 0


UPDATE = "update"
CONTROL_STAGES = ("keys", "shares", "unmask")
STAGE_META = "secagg_stage"  # ClientResult.meta key of a control answer's stage


def stage_of(task: TrainTask) -> str:
    """A task's stage: a secure-aggregation control stage, else "update"."""
    info = task.options.get("secagg")
    stage = info.get("stage") if isinstance(info, dict) else None
    return stage if stage in CONTROL_STAGES else UPDATE


def result_stage(result: ClientResult) -> str:
    """The stage a result answers (the servicer sets `meta[STAGE_META]` after its checks)."""
    stage = result.meta.get(STAGE_META)
    return stage if stage in CONTROL_STAGES else UPDATE


class GrpcTransport(Transport):
    def __init__(self, names: list[str]):
        self._names = list(names)
        self._cond = threading.Condition()
        self.clients = {n: ClientRecord(n, i) for i, n in enumerate(names)}
        self._open: dict[str, TrainTask] = {}
        self._results: deque[ClientResult] = deque()
        # keys are (client, round, stage)
        self._accepted: set[tuple[str, int, str]] = set()
        self._held: set[tuple[str, int, str]] = set()  # queued or in the engine's hands, not released
        self._rejections: dict[tuple[str, int, str], str] = {}  # released with a rejection, not yet told
        self._done = False
        # Updates of at least `spill_min_bytes` are received into a temporary file in
        # `spill_dir` (None: never); the server sets them when its strategy folds updates.
        self.spill_min_bytes: int | None = None
        self.spill_dir: str | None = None
        # The engine's checks of a plain update's tensors, run as its chunks arrive
        # (`ServerCore.blob_check`); None: the engine checks once the update is in.
        self.blob_check = None

    # ------------------------------------------------------------ engine side

    def client_names(self) -> list[str]:
        return list(self._names)

    def send(self, client: str, task: TrainTask) -> None:
        with self._cond:
            old = self._open.get(client)
            if old is not None:
                log.warning("client %s never finished round %d; its task is replaced by round %d", client, old.round, task.round)
            self._open[client] = task
            self._cond.notify_all()

    def receive(self, timeout: float | None = None) -> ClientResult | None:
        end = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while not self._results:
                left = None if end is None else end - time.monotonic()
                if left is not None and left <= 0:
                    return None
                self._cond.wait(left)
            return self._results.popleft()

    def release(self, result: ClientResult, rejection: str | None = None) -> None:
        """The engine is done with `result`; `rejection` says why it refused it (None: taken)."""
        with self._cond:
            key = (result.client, result.round, result_stage(result))
            if rejection is not None and key in self._held:
                self._rejections[key] = rejection
            self._held.discard(key)
            self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            self._done = True
            self._open.clear()
            self._cond.notify_all()

    # ------------------------------------------------------------ servicer side

    def receive_buffer(self, size: int, what: str) -> Assembler | SpillWriter:
        """Where an update of `size` bytes is received: one buffer in memory, or a spill
        file for a large one when the engine folds updates slab by slab (`compression/slabs.py`)."""
        if self.spill_min_bytes is not None and size >= self.spill_min_bytes:
            return SpillWriter(size, self.spill_dir, what)
        return Assembler(size, what)

    @property
    def done(self) -> bool:
        return self._done

    def next_task(self, client: str, wait_s: float) -> TrainTask | None | bool:
        """The client's open task; None if none arrives within `wait_s`; False when training is over."""
        end = time.monotonic() + max(0.0, wait_s)
        with self._cond:
            while True:
                if self._done:
                    self.clients[client].told_done = True
                    self._cond.notify_all()
                    return False
                task = self._open.get(client)
                if task is not None:
                    return task
                left = end - time.monotonic()
                if left <= 0:
                    return None
                self._cond.wait(left)

    def check_open(self, client: str, round: int, base_version: int | None = None, stage: str = UPDATE) -> None:
        """Raise unless a result from `client` for `round` and `stage` (built on `base_version`) may come now."""
        with self._cond:
            self._check_open(client, round, base_version, stage)

    def _check_open(self, client: str, round: int, base_version: int | None, stage: str) -> None:
        if (client, round, stage) in self._accepted:
            what = f"round {round} update" if stage == UPDATE else f"round {round} {stage} answer"
            raise AlreadyReceivedError(f"client {client!r} already pushed its {what} (or had it refused); one push per round")
        task = self._open.get(client)
        if task is None or task.round != round or stage_of(task) != stage:
            current = "none" if task is None else f"{task.round}" + ("" if stage_of(task) == UPDATE else f" ({stage_of(task)})")
            what = f"round {round}" if stage == UPDATE else f"round {round} ({stage})"
            raise RoundClosedError(f"{what} is not open for client {client!r} (its open round: {current}); refused")
        if base_version is not None and base_version != task.version:
            raise RoundClosedError(
                f"client {client!r}: the round {round} {'update' if stage == UPDATE else stage + ' answer'} says it is "
                f"built on model version {base_version}, but the task sent it version {task.version}; refused"
            )

    def submit(self, result: ClientResult) -> None:
        """Queue a result for the engine; raise if its round and stage are not open or already received."""
        with self._cond:
            stage = result_stage(result)
            self._check_open(result.client, result.round, None, stage)
            key = (result.client, result.round, stage)
            self._accepted.add(key)
            if result.payload is not None:
                self._held.add(key)
            del self._open[result.client]
            if stage == UPDATE:
                self.clients[result.client].rounds_submitted.append(result.round)
            self._results.append(result)
            self._cond.notify_all()

    def wait_released(self, client: str, round: int, timeout_s: float, stage: str = UPDATE) -> Verdict:
        """Wait until the engine has released (client, round, stage)'s result, with its rejection if any."""
        end = time.monotonic() + timeout_s
        key = (client, round, stage)
        with self._cond:
            while key in self._held and not self._done:
                left = end - time.monotonic()
                if left <= 0:
                    return Verdict(False)
                self._cond.wait(left)
            return Verdict(key not in self._held, self._rejections.pop(key, None))

    # ------------------------------------------------------------ registry

    def register(self, name: str, session: str, num_tokens: int) -> ClientRecord:
        with self._cond:
            rec = self.clients[name]
            rec.session = session
            rec.registrations += 1
            rec.told_done = False
            if num_tokens > 0:
                rec.num_tokens = num_tokens
            rec.last_seen = time.monotonic()
            self._cond.notify_all()
            return rec

    def session_of(self, name: str) -> str | None:
        with self._cond:
            rec = self.clients.get(name)
            return None if rec is None else rec.session

    def wait_for_clients(self, min_clients: int, join_timeout_s: float, poll_s: float = 5.0) -> list[str]:
        """Block until every client is ready, or, after `join_timeout_s`, at least `min_clients`."""
        start = time.monotonic()
        with self._cond:
            while True:
                ready = [n for n in self._names if self.clients[n].ready]
                if len(ready) == len(self._names):
                    return ready
                waited = time.monotonic() - start
                if waited >= join_timeout_s and len(ready) >= min_clients:
                    missing = [n for n in self._names if n not in ready]
                    log.warning("join timeout: starting with %s; still missing %s", ready, missing)
                    return ready
                self._cond.wait(poll_s if waited >= join_timeout_s else min(poll_s, join_timeout_s - waited))

    def wait_told_done(self, timeout_s: float) -> list[str]:
        """After `close`: wait until every registered client has heard that training is over."""
        end = time.monotonic() + timeout_s
        with self._cond:
            while True:
                pending = [n for n, r in self.clients.items() if r.session is not None and not r.told_done]
                left = end - time.monotonic()
                if not pending or left <= 0:
                    return pending
                self._cond.wait(left)

    def checkpoint_parts(self) -> dict:
        return {"registry": _Registry(self)}

    def registry_state(self) -> dict[str, dict]:
        with self._cond:
            return {n: {"num_tokens": r.num_tokens, "rounds_submitted": list(r.rounds_submitted)} for n, r in self.clients.items()}

    def load_registry_state(self, state: dict[str, dict]) -> None:
        with self._cond:
            for name, rec in state.items():
                if name in self.clients:
                    self.clients[name].num_tokens = int(rec.get("num_tokens", 0))
                    self.clients[name].rounds_submitted = list(rec.get("rounds_submitted", []))


class _Registry:
    """The client registry as a checkpoint part (token counts, rounds submitted)."""

    def __init__(self, transport: GrpcTransport):
        self.transport = transport

    def state_dict(self) -> dict:
        return self.transport.registry_state()

    def load_state_dict(self, state: dict) -> None:
        self.transport.load_registry_state(state)
