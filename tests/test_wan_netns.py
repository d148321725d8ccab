"""A real WAN on this host (issue 16, item 6): `skyfed server` and three `skyfed client`
processes over TLS with tokens, each in its own network namespace, each client's link
rate-limited by `tc tbf` both ways and delayed by a relay (tests/wan_lab.py).

Checked against the simulator's cloud model (skyfed.clouds, the links as cloud profiles):
- bytes: what crossed each link, counted by the relay at the server's end, is the egress
  ledger's payload bytes plus framing (TLS records, HTTP/2 and gRPC frames: at most 0.5%)
  plus the session (TLS handshake, registration with the tokenizer, polls: at most 64 KiB
  per client and direction); the veth (layer 2) carried at least as much;
- time: lower bounds only, from bytes and rates. Each measured transfer lasts at least
  (bytes - tbf bucket) x 8 / rate + RTT/2, and the round at least the slow link's download
  plus upload by the same bound, the largest of the three links'.
Skipped, with the reason, where namespaces or tc are not permitted (not root, no ip/tc, EPERM).
"""

from __future__ import annotations

import pytest

from wan_analysis import compare_bytes, measured_timing
from wan_federation import run_wan
from wan_lab import Link, skip_reason, tbf_burst_bytes

LINKS = [Link("aws", 200, 200, 20), Link("gcp", 100, 100, 40), Link("azure", 20, 20, 80)]
FRAMING = 0.005  # relative: TLS, HTTP/2 and gRPC framing of the payload
SESSION = 64 * 1024  # absolute, per client and direction: handshake, registration (tokenizer), polls


def transfer_bound_s(nbytes: int, mbps: float, rtt_ms: float) -> float:
    """No transfer through a tbf link with a relay holding rtt/2 can be faster than this."""
    return max(0, nbytes - tbf_burst_bytes(mbps)) * 8 / (mbps * 1e6) + rtt_ms / 2000


@pytest.fixture(scope="module")
def wan(tmp_path_factory, shared_cache):
    reason = skip_reason()
    if reason:
        pytest.skip(reason)
    return run_wan(tmp_path_factory.mktemp("wan"), LINKS, rounds=1, timeout_s=300)


@pytest.mark.processes  # a server, three clients and six relays
def test_bytes_on_the_links_match_the_egress_ledger(wan):
    b = compare_bytes(wan)
    assert b["server_cloud"] == "hub" and set(b["ledger"]) == {"hub", "aws", "gcp", "azure"}
    for c, row in b["clients"].items():
        for d in ("up", "down"):
            x = row[d]
            assert x["ledger"] > 1_000_000, (c, d, x)  # a whole model crossed
            assert x["ledger"] <= x["in_transfers"] <= x["ledger"] * (1 + FRAMING), (c, d, x)
            assert x["in_transfers"] < x["relay"] <= x["ledger"] * (1 + FRAMING) + SESSION, (c, d, x)
            assert x["veth"] >= x["relay"], (c, d, x)
        assert b["ledger"][c] == row["up"]["ledger"]
    down = b["server_down"]
    assert down["ledger"] == sum(row["down"]["ledger"] for row in b["clients"].values())
    assert down["ledger"] <= down["relay"] <= down["ledger"] * (1 + FRAMING) + 3 * SESSION


@pytest.mark.processes
def test_the_slow_link_bounds_the_round(wan):
    timing = measured_timing(wan)
    (m,) = wan["metrics"]
    bounds = {}
    for link in LINKS:
        c = link.name
        assert timing[c] is not None, f"{c}: the task and update transfers were not found in the relay logs"
        (t,) = timing[c]
        down = transfer_bound_s(m["bytes_down_by_client"][c], link.down_mbps, link.rtt_ms)
        up = transfer_bound_s(m["bytes_up_by_client"][c], link.up_mbps, link.rtt_ms)
        assert t["download_s"] >= down and t["upload_s"] >= up, (c, t, down, up)
        assert t["between_s"] > 0 and t["total_s"] >= down + up, (c, t)
        bounds[c] = down + up
    assert max(bounds, key=bounds.get) == "azure"
    assert m["wall_time_s"] >= bounds["azure"] > 4 * max(bounds["aws"], bounds["gcp"])
