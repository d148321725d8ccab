"""Asynchronous security through the real event loop (a scripted transport with a simulated
clock, tests/test_strategies_async.py): replayed, forged and foreign results are ignored,
a fast client's share is capped, stale updates are dropped."""

import dataclasses
import heapq

import torch
from test_strategies_async import SimTransport, lines, make_engine

from skyfed.compression.payload import encode_payload
from skyfed.federation.messages import ClientResult
from skyfed.federation.strategies import build_strategy


class ReplayingTransport(SimTransport):
    """After each genuine arrival, also delivers: a copy of it (a replay), a result for a task
    never sent, and a result from a client that is not in the federation."""

    def receive(self, timeout=None):
        result = super().receive(timeout)
        if result is not None and not result.meta.get("forged"):
            big = encode_payload({"w": torch.tensor([1000.0, 1000.0])}, kind="update", round=result.round, client=result.client)
            extra = [
                dataclasses.replace(result, meta={"forged": "replay"}),
                ClientResult(result.client, result.round + 100, result.base_version, big, num_tokens=10, meta={"forged": "unsent"}),
                ClientResult("z", result.round, result.base_version, big, num_tokens=10, meta={"forged": "foreign"}),
            ]
            for r in extra:
                heapq.heappush(self.heap, (-1, self.seq, self.clock, r))  # delivered next
                self.seq += 1
        return result


def test_replayed_unsent_and_foreign_results_never_touch_the_model(tmp_path):
    for name, params in [("fedasync", {"alpha": 0.5, "staleness": "constant"}), ("fedbuff", {"buffer_size": 2})]:
        clean = make_engine(tmp_path / f"{name}-clean", build_strategy(name, params), SimTransport({"a": 1.0, "c": 3.0}))
        clean.run()
        t = ReplayingTransport({"a": 1.0, "c": 3.0})
        attacked = make_engine(tmp_path / name, build_strategy(name, params), t)
        attacked.run()
        assert torch.equal(attacked.params["w"], clean.params["w"]), name
        assert attacked.version == clean.version
        rows = lines(tmp_path / name)
        assert rows[-1]["updates"] == 4 and sum(len(r["arrivals"]) for r in rows) == 4
        assert all("z" not in r["arrivals"] for r in rows)


def test_share_cap_limits_a_fast_client_through_the_loop(tmp_path):
    # a finishes a task every 1 s, c every 10 s; budget 3 rounds x 2 clients = 6 tasks:
    # arrivals a a a a a c. With a cap of 2 of the last 4 arrivals, a's 3rd-5th are dropped.
    params = {"alpha": 1.0, "staleness": "constant", "max_client_share": 0.5, "share_window": 4}
    engine = make_engine(tmp_path, build_strategy("fedasync", params), SimTransport({"a": 1.0, "c": 10.0}), rounds=3)
    engine.run()
    assert engine.version == 3  # a, a, c published; 3 dropped
    rows = lines(tmp_path)
    assert sum(len(r["arrivals"]) for r in rows) == 6
    dropped = [m.get("share_dropped") for r in rows for m in r["strategy_metrics"] if m.get("share_dropped")]
    assert dropped == [{"a": 3}]  # reported with the next publication (c's)
    free = make_engine(tmp_path / "free", build_strategy("fedasync", {"alpha": 1.0, "staleness": "constant"}),
                       SimTransport({"a": 1.0, "c": 10.0}), rounds=3)
    free.run()
    assert free.version == 6


def test_max_staleness_drops_old_updates_in_fedbuff(tmp_path):
    # a: 1 s, c: 5 s. c's first update (base v0) arrives after a's published 4 versions (buffer 1).
    s = build_strategy("fedbuff", {"buffer_size": 1, "max_staleness": 2})
    engine = make_engine(tmp_path, s, SimTransport({"a": 1.0, "c": 5.0}), rounds=3)
    engine.run()
    rows = lines(tmp_path)
    assert {c: v for r in rows for c, v in r["dropped"].items()} == {"c": 4}
    assert engine.version == 5  # 6 arrivals, c's dropped
