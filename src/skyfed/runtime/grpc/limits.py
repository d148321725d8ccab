"""Bounds on the server's calls: how many at once per client and per peer address, and
how long each may last (a watchdog that cancels calls past their deadline or idle).

A server thread is held by every call in progress, so without these bounds a few
streams that never send anything can hold every worker. `CallLimits` refuses the
excess; `Watchdog` cancels a call that runs longer than `stream_timeout_s`, or waits
longer than `idle_timeout_s` for the peer's next message (or for the peer to take the
next message the server sends). Waits on the server's own side (a long poll for a
task, the engine folding an update) are not idle time.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from dataclasses import dataclass

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CallBounds:
    """The front door's limits (`skyfed server` flags of the same names)."""

    max_calls_per_client: int = 4
    max_calls_per_peer: int = 32
    stream_timeout_s: float = 900.0
    idle_timeout_s: float = 60.0
    session_ttl_s: float = 600.0  # --open: how long a silent session keeps its name

    def __post_init__(self) -> None:
        from skyfed.errors import ConfigError

        if self.max_calls_per_client < 1 or self.max_calls_per_peer < 1:
            raise ConfigError("--max-calls-per-client and --max-calls-per-peer must be at least 1")
        if self.stream_timeout_s <= 0 or self.idle_timeout_s <= 0 or self.session_ttl_s < 0:
            raise ConfigError("--stream-timeout and --idle-timeout must be positive, --session-ttl not negative")


def worker_threads(num_clients: int, bounds: CallBounds) -> int:
    """Threads enough for every client's allowed calls at once, plus room for refusals."""
    return num_clients * bounds.max_calls_per_client + 8


def max_concurrent_rpcs(workers: int) -> int:
    """Calls gRPC admits at once (running or queued for a thread); beyond, it answers
    RESOURCE_EXHAUSTED itself without running any Python."""
    return 2 * workers


class LimitExceeded(Exception):
    """Too many calls at once from one client or one peer address."""


class CallLimits:
    """Counts calls in progress per peer address and per client name."""

    def __init__(self, per_client: int, per_peer: int):
        self.per_client = per_client
        self.per_peer = per_peer
        self._lock = threading.Lock()
        self.by_peer: Counter[str] = Counter()
        self.by_client: Counter[str] = Counter()

    def enter_peer(self, peer: str) -> None:
        with self._lock:
            if self.by_peer[peer] >= self.per_peer:
                raise LimitExceeded(f"too many concurrent calls from {peer} (at most {self.per_peer})")
            self.by_peer[peer] += 1

    def leave_peer(self, peer: str) -> None:
        with self._lock:
            self.by_peer[peer] -= 1
            if self.by_peer[peer] <= 0:
                del self.by_peer[peer]

    def enter_client(self, name: str) -> None:
        with self._lock:
            if self.by_client[name] >= self.per_client:
                raise LimitExceeded(f"too many concurrent calls for client {name!r} (at most {self.per_client})")
            self.by_client[name] += 1

    def leave_client(self, name: str) -> None:
        with self._lock:
            self.by_client[name] -= 1
            if self.by_client[name] <= 0:
                del self.by_client[name]

    def active(self, name: str) -> int:
        with self._lock:
            return self.by_client.get(name, 0)


class Ticket:
    """One watched call: its overall deadline and, while it waits on the peer, an idle one."""

    def __init__(self, cancel, what: str, deadline: float, idle_s: float):
        self._cancel = cancel
        self.what = what
        self.deadline = deadline
        self.idle_s = idle_s
        self.idle_deadline: float | None = None
        self.reason: str | None = None  # why the watchdog cancelled the call

    def waiting(self) -> None:
        """The call now waits on its peer (to send a message, or to take one)."""
        self.idle_deadline = time.monotonic() + self.idle_s

    def done_waiting(self) -> None:
        self.idle_deadline = None

    def expired(self, now: float) -> str | None:
        if now >= self.deadline:
            return "ran past the stream deadline"
        if self.idle_deadline is not None and now >= self.idle_deadline:
            return f"the peer sent or took nothing for {self.idle_s:g}s"
        return None


class Watchdog:
    """A thread that cancels watched calls past their deadline or idle for too long."""

    def __init__(self, stream_timeout_s: float, idle_timeout_s: float, tick_s: float | None = None):
        self.stream_timeout_s = stream_timeout_s
        self.idle_timeout_s = idle_timeout_s
        self.tick_s = tick_s if tick_s is not None else min(1.0, idle_timeout_s / 4, stream_timeout_s / 4)
        self._lock = threading.Lock()
        self._tickets: set[Ticket] = set()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def watch(self, cancel, what: str) -> Ticket:
        """Watch a call; `cancel()` ends it. Remove it with `forget` when the call ends."""
        ticket = Ticket(cancel, what, time.monotonic() + self.stream_timeout_s, self.idle_timeout_s)
        with self._lock:
            self._tickets.add(ticket)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="skyfed-watchdog", daemon=True)
                self._thread.start()
        return ticket

    def forget(self, ticket: Ticket) -> None:
        with self._lock:
            self._tickets.discard(ticket)

    def check(self, now: float | None = None) -> int:
        """Cancel every expired call now; return how many."""
        now = time.monotonic() if now is None else now
        with self._lock:
            expired = [(t, r) for t in self._tickets if (r := t.expired(now)) is not None]
            for t, _ in expired:
                self._tickets.discard(t)
        for ticket, reason in expired:
            ticket.reason = reason
            log.warning("cancelled %s: %s", ticket.what, reason)
            try:
                ticket._cancel()
            except Exception as exc:  # a call that just ended cannot be cancelled
                log.debug("cancel of %s failed: %s", ticket.what, exc)
        return len(expired)

    def _run(self) -> None:
        while not self._stop.wait(self.tick_s):
            self.check()

    def close(self) -> None:
        self._stop.set()
