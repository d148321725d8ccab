"""The WAN test's delay relay (tests/wan_relay.py) on loopback: every byte arrives, in
order, each way held at least the configured delay, and the counters and log add up.
No root needed."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

RELAY = Path(__file__).with_name("wan_relay.py")


def echo_server() -> int:
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()

    def serve() -> None:
        conn, _ = srv.accept()
        while data := conn.recv(1 << 16):
            conn.sendall(data)
        conn.close()
        srv.close()

    threading.Thread(target=serve, daemon=True).start()
    return srv.getsockname()[1]


def test_relay_delays_both_ways_and_counts(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    stats, ready = tmp_path / "stats.json", tmp_path / "ready"
    p = subprocess.Popen([sys.executable, str(RELAY), "--listen", f"127.0.0.1:{port}", "--connect", f"127.0.0.1:{echo_server()}",
                          "--delay-ms", "50", "--stats", str(stats), "--ready", str(ready)])
    try:
        end = time.monotonic() + 60
        while not ready.exists():
            assert p.poll() is None and time.monotonic() < end, "the relay did not start"
            time.sleep(0.01)
        blob = os.urandom(3_000_000)
        with socket.create_connection(("127.0.0.1", port)) as c:
            t = time.monotonic()
            c.sendall(b"x")
            assert c.recv(1) == b"x"
            assert time.monotonic() - t >= 0.1  # held 50 ms each way
            threading.Thread(target=c.sendall, args=(blob,), daemon=True).start()
            got = bytearray()
            while len(got) < len(blob):
                got += c.recv(1 << 20)
            assert bytes(got) == blob
    finally:
        p.terminate()
        assert p.wait(timeout=30) == 0
    s = json.loads(stats.read_text())
    assert s["bytes"] == {"up": len(blob) + 1, "down": len(blob) + 1} and s["connections"] == 1
    assert sum(n for _, d, n in s["events"] if d == "up") == len(blob) + 1
