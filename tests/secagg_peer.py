"""A secure-aggregation client in its own process, speaking JSON lines on stdin/stdout
(a stand-in transport for tests/test_secagg_processes.py).

    python tests/secagg_peer.py NAME CLIENTS DIM

Its input is fixed by its name: FixedPoint(32, 1.0, CLIENTS) of uniform(-1, 1) values
drawn with seed int(NAME[1:]), so the test can compute the expected sum.
"""

from __future__ import annotations

import json
import sys

import numpy as np

from skyfed.security.secagg import FixedPoint, SecAggClient, SecAggParams
from skyfed.security.secagg.crypto import b64e


def peer_input(name: str, clients: int, dim: int) -> np.ndarray:
    fp = FixedPoint(32, 1.0, clients)
    return fp.quantize(np.random.default_rng(int(name[1:])).uniform(-1, 1, dim))


def main() -> None:
    name, clients, dim = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    client = SecAggClient(name, SecAggParams(32, dim))
    fp = FixedPoint(32, 1.0, clients)
    for line in sys.stdin:
        msg = json.loads(line)
        op = msg["op"]
        if op == "advertise":
            out = client.advertise()
        elif op == "share":
            out = client.share_keys(msg["roster"])
        elif op == "mask":
            out = {"masked": b64e(client.mask(msg["bundle"], fp.to_ring(peer_input(name, clients, dim))))}
        elif op == "unmask":
            out = client.unmask(msg["request"])
        else:
            break
        sys.stdout.write(json.dumps(out) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
