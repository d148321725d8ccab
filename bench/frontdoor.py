"""Benchmark: the server's front door under the attacks of issue 12, on a real `skyfed server`.

    PYTHONPATH=src python bench/frontdoor.py            # writes bench/results/frontdoor.json

A `skyfed server` process (smoke preset, clients `aws` and `eve`, plaintext, `--open`,
default limits) is attacked from this process:

1. flood: `--streams` PushUpdate streams that never send, without identity, and as
   many with eve's valid session; then `aws` registers: how long its Register takes, and
   how each flood stream ended;
2. three concurrent announcements of 2 GiB each from eve: the server's resident memory
   before and its peak (VmHWM, reset through /proc/PID/clear_refs) after;
3. the size bound the server logged against the size of a real (all-zero) update.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

from procfs import reset_peak, status_bytes

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--streams", type=int, default=30)
    p.add_argument("--announce-gib", type=float, default=2.0)
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "frontdoor.json"))
    args = p.parse_args(argv)

    import grpc
    import torch

    from skyfed.compression.payload import encode_payload
    from skyfed.compression.wire import unpack
    from skyfed.runtime.grpc import PROTOCOL_VERSION, skyfed_pb2 as pb
    from skyfed.runtime.grpc.auth import call_metadata
    from skyfed.runtime.grpc.client import ClientOptions, FederationSession
    from skyfed.runtime.grpc.rawchunks import SERVICE

    torch.set_num_threads(1)
    import socket
    import tempfile

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    tmp = Path(tempfile.mkdtemp())
    log_path = tmp / "server.log"
    cmd = [sys.executable, "-m", "skyfed", "server", "--preset", "smoke", "--set", "threads=1",
           "--set", "federation.clients=[{name: aws}, {name: eve}]", "--set", "federation.min_clients=1",
           "--set", "federation.round_timeout_s=600", "--listen", f"127.0.0.1:{port}", "--insecure", "--open",
           "--out", str(tmp / "run")]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    server = subprocess.Popen(cmd, stdout=open(log_path, "wb"), stderr=subprocess.STDOUT, env=env)
    stop = threading.Event()
    try:
        opts = dict(insecure=True, connect_timeout_s=600, max_backoff_s=1)
        eve = FederationSession(ClientOptions(f"127.0.0.1:{port}", "eve", **opts))
        eve.register(1000)

        def silent():
            stop.wait(300)
            return
            yield b""

        push = eve.channel.stream_unary(f"/{SERVICE}/PushUpdate")
        flood = [("anonymous", push.future(silent(), timeout=300)) for _ in range(args.streams)]
        flood += [("eve", push.future(silent(), timeout=300, metadata=call_metadata(PROTOCOL_VERSION, "eve", session=eve.session_id)))
                  for _ in range(args.streams)]
        time.sleep(1.0)  # let the flood reach the server
        aws = FederationSession(ClientOptions(f"127.0.0.1:{port}", "aws", **opts))
        t0 = time.perf_counter()
        aws.register(1000)
        register_s = time.perf_counter() - t0
        ended: dict[str, Counter] = {}
        for kind, fut in flood:
            if fut.done():
                ended.setdefault(kind, Counter())[fut.exception().code().name] += 1
            else:
                ended.setdefault(kind, Counter())["still open"] += 1
        stop.set()

        task = eve.pull()
        while task.status != "task":
            task = eve.pull()
        pid = server.pid
        reset_peak(pid)
        rss_before = status_bytes("VmRSS", pid)
        size = int(args.announce_gib * 2**30)
        head = pb.UpdateHeader(round=task.task.round, base_version=task.task.version, num_tokens=1000, payload_bytes=size)
        codes: list[str] = []

        def announce():
            try:
                eve.push_raw(head, b"")
            except grpc.RpcError as err:
                codes.append(err.code().name)

        threads = [threading.Thread(target=announce) for _ in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        hwm_after = status_bytes("VmHWM", pid)
        params, _ = unpack(task.task.payload)
        real = len(encode_payload({n: torch.zeros_like(t) for n, t in params.items()}, kind="update",
                                  round=task.task.round, client="eve", base_version=task.task.version))
        bound = int(re.search(r"updates larger than (\d+) bytes", log_path.read_text()).group(1))
        out = {
            "command": "PYTHONPATH=src python bench/frontdoor.py " + " ".join(sys.argv[1:] if argv is None else argv),
            "load_average_1_5_15": os.getloadavg(),
            "flood": {"streams_per_kind": args.streams, "legit_register_s": register_s,
                      "ended_after_1s": {k: dict(v) for k, v in ended.items()}},
            "announcement": {"announced_bytes_each": size, "concurrent": 3, "codes": codes,
                             "server_rss_before": rss_before, "server_peak_after": hwm_after,
                             "peak_growth_bytes": hwm_after - rss_before},
            "size_bound": {"bound_bytes": bound, "real_update_bytes": real, "slack_bytes": bound - real},
        }
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
        print(json.dumps(out, indent=2))
        eve.close()
        aws.close()
    finally:
        stop.set()
        server.kill()
        server.wait(30)


if __name__ == "__main__":
    main()
