"""A cap on each client's share of an asynchronous window, so a fast or hostile cloud
cannot flood the model with its updates (FedAsync, FedBuff: `max_client_share`).

The window is the last `share_window` arrivals the strategy was offered (accepted or
not). A client may have at most max(1, floor(max_client_share * share_window)) accepted
updates among them; an arrival beyond that is dropped (and logged) before it touches
the model. With equal-speed clients each has about share_window / n of any window, so
a cap of 2/n leaves honest clients alone and halves what a client twice as fast as the
rest could otherwise push in. The window is part of the strategy's state_dict.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from typing import Any

from skyfed.federation.strategies.params import integer, number

log = logging.getLogger(__name__)


class ShareCap:
    def __init__(self, max_client_share: float | None, share_window: int):
        self.max_share = None if max_client_share is None else number("max_client_share", max_client_share, 0.0, 1.0, lo_open=True)
        self.window_size = integer("share_window", share_window, 1)
        self.window: deque[tuple[str, bool]] = deque(maxlen=self.window_size)  # (client, accepted)
        self.dropped: dict[str, int] = {}  # since the last report

    @property
    def cap(self) -> int | None:
        return None if self.max_share is None else max(1, math.floor(self.max_share * self.window_size + 1e-9))

    def admit(self, client: str) -> bool:
        """Record an arrival; False when `client` already has its cap of the window."""
        cap = self.cap
        ok = cap is None or sum(1 for c, acc in self.window if c == client and acc) < cap
        self.window.append((client, ok))
        if not ok:
            self.dropped[client] = self.dropped.get(client, 0) + 1
            log.warning("dropped an update from %s: it already has %d of the last %d arrivals (max_client_share %.3g)",
                        client, cap, self.window_size, self.max_share)
        return ok

    def report(self) -> dict[str, Any]:
        """Drops since the last report (for the next published metrics), then cleared."""
        out, self.dropped = ({"share_dropped": dict(self.dropped)} if self.dropped else {}), {}
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"window": [list(e) for e in self.window], "dropped": dict(self.dropped)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.window = deque(((c, bool(a)) for c, a in state.get("window", [])), maxlen=self.window_size)
        self.dropped = dict(state.get("dropped", {}))
