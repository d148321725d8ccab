"""Secure aggregation across real processes: five clients, each its own OS process
speaking JSON lines; one is killed (SIGKILL) right after it sent its masked vector. The
server still recovers the exact sum of the other four; with three killed it refuses."""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from skyfed.errors import SecAggError
from skyfed.security.secagg import FixedPoint, SecAggParams, SecAggServer
from skyfed.security.secagg.crypto import b64d

sys.path.insert(0, str(Path(__file__).parent))
from secagg_peer import peer_input  # noqa: E402

DIM, N = 64, 5


class Peer:
    def __init__(self, name: str):
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1] / "src"), os.environ.get("PYTHONPATH", "")])}
        self.name = name
        self.proc = subprocess.Popen([sys.executable, str(Path(__file__).parent / "secagg_peer.py"), name, str(N), str(DIM)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)

    def ask(self, msg: dict) -> dict:
        self.proc.stdin.write(json.dumps(msg) + "\n")
        self.proc.stdin.flush()
        ready, _, _ = select.select([self.proc.stdout], [], [], 60)
        assert ready, f"{self.name} did not answer in 60 s"
        return json.loads(self.proc.stdout.readline())

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)


@pytest.fixture
def peers():
    started = {f"c{i}": Peer(f"c{i}") for i in range(N)}
    yield started
    for p in started.values():
        p.close()


def run_until_masked(peers: dict, kill: set[str]) -> SecAggServer:
    server = SecAggServer(SecAggParams(32, DIM))
    for name, p in peers.items():
        server.receive_keys(name, p.ask({"op": "advertise"}))
    roster = server.roster()
    for name, p in peers.items():
        server.receive_shares(name, p.ask({"op": "share", "roster": roster}))
    server.close_sharing()
    for name, p in peers.items():
        masked = b64d(p.ask({"op": "mask", "bundle": server.bundle_for(name)})["masked"], "masked")
        if name in kill:
            p.proc.kill()  # dies after masking: its vector is lost with it
            p.proc.wait(timeout=10)
        else:
            server.add_masked(name, masked)
    return server


def test_one_of_five_processes_killed_after_masking_gives_the_exact_sum_of_four(peers):
    server = run_until_masked(peers, kill={"c3"})
    assert peers["c3"].proc.returncode is not None
    request = server.unmask_request()
    assert request["dropped"] == ["c3"]
    for name in request["survivors"]:
        server.receive_unmask(name, peers[name].ask({"op": "unmask", "request": request}))
    result = server.finish()
    fp = FixedPoint(32, 1.0, N)
    expected = sum(peer_input(n, N, DIM) for n in ["c0", "c1", "c2", "c4"])
    assert np.array_equal(fp.signed(result.ring_sum), expected)


def test_three_of_five_killed_is_refused(peers):
    server = run_until_masked(peers, kill={"c0", "c2", "c4"})
    with pytest.raises(SecAggError, match="2 of 5 clients sent masked updates; threshold 3"):
        server.unmask_request()
