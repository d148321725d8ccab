"""Per-round simulated time and egress cost, added to each metrics.jsonl line.

An engine observer: at the end of a round it advances the simulated clock by the
measured aggregation time (or a fixed `clouds.aggregation_s`, for a clock that is
bit-for-bit the same on every machine) and reports the cumulative simulated time, the round's
simulated duration, each arrived client's download/compute/upload seconds and the
cumulative egress bill per cloud.
"""

from __future__ import annotations

from typing import Any

from skyfed.clouds import CloudNetwork
from skyfed.runtime.inprocess import SimulatedTransport


class CloudAccounting:
    def __init__(self, transport: SimulatedTransport, network: CloudNetwork, aggregation_s: float | None = None):
        self.transport = transport
        self.aggregation_s = aggregation_s  # fixed simulated aggregation time; None = the measured one
        self.network = network
        self._round_start = transport.now()

    def round_start(self, round: int) -> None:
        self._round_start = self.transport.now()

    def round_end(self, round: int, record: dict[str, Any], outcome: Any) -> dict[str, Any]:
        self.transport.settle()  # bill what was sent before this line, as sequentially
        agg = self.aggregation_s if self.aggregation_s is not None else float(record.get("aggregate_s", 0.0))
        self.transport.elapse(agg)
        now = self.transport.now()
        timing = {c: m["timing"] for c, m in outcome.meta.items() if "timing" in m}
        slowest = max(timing, key=lambda c: timing[c]["arrival_s"]) if timing else None
        return {
            "sim_time_s": now,
            "round_sim_s": now - self._round_start,
            "slowest_client": slowest,
            "client_timing": timing,
            "egress_bytes": dict(self.network.egress_bytes),
            "egress_cost_usd": self.network.egress_cost_usd(),
        }

    def summary(self) -> dict[str, Any]:
        """Fields for summary.json."""
        self.transport.settle()
        return {
            "sim_time_s": self.transport.now(),
            "egress_bytes": dict(self.network.egress_bytes),
            "egress_cost_usd": self.network.egress_cost_usd(),
            "server_cloud": self.network.server_cloud,
            "client_clouds": dict(self.network.client_cloud),
        }
