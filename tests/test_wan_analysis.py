"""The WAN test's bookkeeping on made-up relay logs (tests/wan_analysis.py): which chunks
are a task's or an update's transfer, and what the ledger bills."""

from __future__ import annotations

from wan_analysis import bursts, payload_window, transfer_windows

PAYLOAD = 1_000_000


def round_events(t0: float) -> list[tuple[float, str, int]]:
    """A registration reply, then a 1 MB task in 100 chunks over 0.5 s with window updates
    going the other way, a poll after it; later the update, 1 MB up in 50 chunks."""
    ev = [(t0, "down", 23_000), (t0 + 0.01, "down", 600)]
    for i in range(100):
        ev.append((t0 + 0.1 + i * 0.005, "down", PAYLOAD // 100 + (40 if i == 0 else 0)))  # + gRPC/HTTP2 framing
        if i % 10 == 0:
            ev.append((t0 + 0.1 + i * 0.005, "up", 13))
    ev.append((t0 + 0.7, "up", 300))  # the next call's headers
    for i in range(50):
        ev.append((t0 + 1.0 + i * 0.01, "up", PAYLOAD // 50))
    return sorted(ev)


def test_bursts_leave_out_control_frames_and_split_at_gaps():
    ev = round_events(0.0) + round_events(10.0)
    down = bursts(ev, "down")
    assert len(down) == 2 and [sum(n for _, n in b) for b in down] == [23_000 + PAYLOAD + 40] * 2
    up = bursts(ev, "up")
    assert [sum(n for _, n in b) for b in up] == [PAYLOAD, PAYLOAD]  # the 13- and 300-byte frames are not data


def test_the_payload_window_skips_the_registration_next_to_it():
    (burst,) = bursts(round_events(0.0), "down")
    t0, t1, n = payload_window(burst, PAYLOAD)
    assert (t0, n) == (0.1, PAYLOAD + 40) and abs(t1 - (0.1 + 99 * 0.005)) < 1e-9
    assert payload_window(burst, 2 * PAYLOAD) is None


def test_one_window_per_round_or_none():
    ev = round_events(0.0) + round_events(10.0)
    windows = transfer_windows(ev, "up", [PAYLOAD, PAYLOAD])
    assert [(round(a, 3), round(b, 3), n) for a, b, n in windows] == [(1.0, 1.49, PAYLOAD), (11.0, 11.49, PAYLOAD)]
    assert transfer_windows(ev, "up", [PAYLOAD, PAYLOAD, PAYLOAD]) is None  # a round's transfer is missing
