"""Benchmark: move a 100M-parameter fp32 update (400 MB) client -> server through skyfed's
gRPC path, against a plain TCP socket copy of the same bytes on loopback, in the same run;
and the server's peak memory while receiving and aggregating 3 such updates.

    PYTHONPATH=src python bench/transport.py                     # 100M params, 4 MiB chunks
    PYTHONPATH=src python bench/transport.py --params 10000000   # quicker

The server is a subprocess running skyfed's real servicer (`FederationServicer` +
`GrpcTransport`: header checks, one preallocated buffer per update, CRC-32 framing check
with `compression.wire.read_header`); the client is skyfed's `FederationSession.push_raw`
(4 MiB chunks). The gRPC time runs from the first byte sent until the server has
accepted the validated update. The TCP baseline sends the same bytes over one socket
into a preallocated buffer in the same server process (no framing, no checks).
Memory: the server process runs the production aggregation path: the servicer and
`GrpcTransport` receive each update, and the engine's `SyncLoop.collect` (what
`run_round` calls: it validates each update, folds it into FedAvg's running mean and
publishes the strategy's step) makes the next global model; only the evaluation and the
checkpoint of `run_round` are left out. Peak RSS (VmHWM, reset with /proc/self/clear_refs after the TCP copies) is read in
the server process at the end; the delta is over the RSS the server has before the
first update arrives (imports and the global model included, the running sum not). The
three clients upload one after the other; each upload in flight at the same time adds
one receive buffer (one model size).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import threading
import time
from concurrent import futures
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CLIENTS = ["c0", "c1", "c2"]
STEPS = 1000  # local steps of the bench's tasks: the token counts it claims stay within them


def vm_hwm() -> int:
    """Peak resident set size of this process, bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def vm_rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def reset_hwm() -> None:
    """Reset VmHWM to the current RSS (Linux: write 5 to clear_refs)."""
    Path("/proc/self/clear_refs").write_text("5")


# ---------------------------------------------------------------- server process


def serve(args: argparse.Namespace) -> None:
    import tempfile

    import grpc
    import torch

    from skyfed.config import load_config
    from skyfed.federation.engine import Engine
    from skyfed.federation.messages import TrainTask
    from skyfed.federation.strategies import build_strategy
    from skyfed.federation.window import Window
    from skyfed.metrics import RunDir
    from skyfed.runtime.grpc.rawchunks import add_servicer
    from skyfed.runtime.grpc.security import server_credentials, server_options
    from skyfed.runtime.grpc.servicer import FederationServicer
    from skyfed.runtime.grpc.transport import GrpcTransport

    torch.set_num_threads(1)
    chunk = int(args.chunk_mib * 2**20)
    max_bytes = 2 * args.params * 4 + 2**20
    cfg = load_config(preset="smoke", overrides=[f"federation.max_update_bytes={max_bytes}", "federation.round_timeout_s=600"])
    transport = GrpcTransport(CLIENTS)
    servicer = FederationServicer(transport, "", {}, None, max_bytes, chunk)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8), options=server_options(chunk))
    add_servicer(servicer, server)
    creds = None if args.certs is None else server_credentials(Path(args.certs) / "server.pem", Path(args.certs) / "server.key", None, False)
    port = server.add_insecure_port("127.0.0.1:0") if creds is None else server.add_secure_port("127.0.0.1:0", creds)
    server.start()
    tcp = socket.socket()
    tcp.bind(("127.0.0.1", 0))
    tcp.listen(1)

    tcp_done = []

    def tcp_receiver() -> None:
        while True:
            conn, _ = tcp.accept()
            with conn:
                size = int.from_bytes(conn.recv(8, socket.MSG_WAITALL), "little")
                buf = bytearray(size)
                view, pos = memoryview(buf), 0
                while pos < size:
                    n = conn.recv_into(view[pos:], min(size - pos, 16 * 2**20))
                    if n == 0:
                        break
                    pos += n
                conn.sendall(b"\x01")
                del view, buf
                tcp_done.append(pos)

    threading.Thread(target=tcp_receiver, daemon=True).start()
    model = torch.nn.Module()
    model.w = torch.nn.Parameter(torch.zeros(args.params), requires_grad=False)
    evaluator = None  # collect does not evaluate
    engine = Engine(cfg, transport, model, ["w"], build_strategy("fedavg"), evaluator, RunDir(tempfile.mkdtemp()))
    engine.stream_aggregate = not args.buffered
    Path(args.port_file).write_text(json.dumps({"grpc": port, "tcp": tcp.getsockname()[1]}))
    while len(tcp_done) < args.rounds:  # the TCP baseline copies run first, outside the measurement
        time.sleep(0.05)
    reset_hwm()
    base = vm_rss()
    for round in range(args.rounds):
        tasks = {c: TrainTask(round, engine.version, b"", STEPS) for c in CLIENTS}
        for c, task in tasks.items():
            transport.send(c, task)
        w = Window(round, list(CLIENTS))
        waiting = engine.loop.collect(w, tasks)
        assert w.aggregated and not w.rejected and not waiting, (w.rejected, waiting)
        results = [{"client": c, "bytes": w.bytes_up[c], "weight": w.extra["weights"][c]} for c in w.accepted]
    peak = vm_hwm()
    print(json.dumps({"baseline_rss": base, "peak_hwm": peak, "peak_delta": peak - base, "folds": results,
                      "streamed": engine.stream_aggregate, "global_mean": float(engine.params["w"].mean())}), flush=True)
    server.stop(0)


# ---------------------------------------------------------------- client side


def start_server(args: argparse.Namespace, certs: str | None, rounds: int, tmp: Path):
    port_file = tmp / f"ports-{time.monotonic_ns()}.json"
    cmd = [sys.executable, __file__, "--serve", "--port-file", str(port_file), "--params", str(args.params),
           "--chunk-mib", str(args.chunk_mib), "--rounds", str(rounds)] + (["--certs", certs] if certs else []) \
        + (["--buffered"] if args.buffered else [])
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, env=env)
    for _ in range(1200):
        if port_file.exists() and port_file.stat().st_size:
            return proc, json.loads(port_file.read_text())
        if proc.poll() is not None:
            raise SystemExit("bench server failed to start")
        time.sleep(0.1)
    raise SystemExit("bench server did not start")


def session(args: argparse.Namespace, name: str, port: int, certs: str | None):
    from skyfed.runtime.grpc.client import ClientOptions, FederationSession

    opts = ClientOptions(f"localhost:{port}", name, "", insecure=certs is None,
                         ca_cert=None if certs is None else Path(certs) / "ca.pem")
    s = FederationSession(opts, int(args.chunk_mib * 2**20))
    s.register(1000)
    s.chunk_bytes = int(args.chunk_mib * 2**20)
    return s


def labelled(payload: bytes, client: str, round: int) -> bytes:
    """The same tensors under this push's header fields (the server checks that they match)."""
    from skyfed.compression.wire import _PREFIX, FORMAT_VERSION, MAGIC, read_header

    header, blob = read_header(payload)
    header.update(kind="update", round=round, client=client, base_version=round)
    head = json.dumps(header, separators=(",", ":")).encode()
    return b"".join((_PREFIX.pack(MAGIC, FORMAT_VERSION, len(head)), head, blob))


def push(s, payload: bytes, round: int, weight: int) -> float:
    from skyfed.runtime.grpc import skyfed_pb2 as pb

    payload = labelled(payload, s.opts.name, round)  # untimed
    t0 = time.perf_counter()
    reply = s.push_raw(pb.UpdateHeader(round=round, base_version=round, num_tokens=weight, payload_bytes=len(payload)), payload)
    dt = time.perf_counter() - t0
    assert reply.accepted and not reply.duplicate, reply
    return dt


def tcp_copy(port: int, payload: bytes) -> float:
    t0 = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(len(payload).to_bytes(8, "little"))
        s.sendall(payload)
        assert s.recv(1) == b"\x01"
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--params", type=int, default=100_000_000)
    p.add_argument("--chunk-mib", type=float, default=4.0)
    p.add_argument("--repeats", type=int, default=2, help="transfers per path; the best is reported")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "transport.json"))
    p.add_argument("--buffered", action="store_true", help="aggregate the round's list of updates instead of folding (for comparison)")
    p.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--port-file", help=argparse.SUPPRESS)
    p.add_argument("--certs", help=argparse.SUPPRESS)
    p.add_argument("--rounds", type=int, default=1, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.serve:
        return serve(args)

    import tempfile

    import torch

    from skyfed.compression.payload import encode_payload
    from skyfed.runtime.grpc.certs import make_dev_certs

    torch.set_num_threads(1)
    payload = encode_payload({"w": torch.rand(args.params)}, kind="update", round=0, client="c0")
    size = len(payload)
    out: dict = {"params": args.params, "payload_bytes": size, "chunk_bytes": int(args.chunk_mib * 2**20),
                 "repeats": args.repeats, "cpu_count": os.cpu_count(), "aggregation": "buffered" if args.buffered else "streamed"}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        make_dev_certs(tmp / "certs", CLIENTS, ["localhost", "127.0.0.1"])
        for mode, certs in [("insecure", None), ("tls", str(tmp / "certs"))]:
            rounds = args.repeats
            proc, ports = start_server(args, certs, rounds, tmp)
            sessions = [session(args, c, ports["grpc"], certs) for c in CLIENTS]
            grpc_s, tcp_s = [], []
            for r in range(rounds):
                tcp_s.append(tcp_copy(ports["tcp"], payload))
            for r in range(rounds):
                for i, s in enumerate(sessions):
                    while (task := s.pull()).status != "task" or task.task.round != r:
                        pass  # the round's task opens the round for this client (untimed)
                    dt = push(s, payload, r, 1000 * (i + 1))
                    if i == 0:
                        grpc_s.append(dt)
            server_out, _ = proc.communicate(timeout=600)
            mem = json.loads(server_out.decode().strip().splitlines()[-1])
            best_grpc, best_tcp = min(grpc_s), min(tcp_s)
            out[mode] = {
                "grpc_s": grpc_s, "tcp_s": tcp_s,
                "grpc_MBps": size / best_grpc / 1e6, "tcp_MBps": size / best_tcp / 1e6,
                "throughput_ratio": best_tcp / best_grpc,
                "server_peak_delta_bytes": mem["peak_delta"],
                "server_peak_delta_x_model": mem["peak_delta"] / (4 * args.params),
                "server_baseline_rss_bytes": mem["baseline_rss"],
                "folds": mem["folds"],
            }
            for s in sessions:
                s.close()
            print(f"{mode:>8}: gRPC {out[mode]['grpc_MBps']:.0f} MB/s, TCP {out[mode]['tcp_MBps']:.0f} MB/s, "
                  f"ratio {out[mode]['throughput_ratio']:.2f}; server peak +{mem['peak_delta'] / 1e9:.2f} GB "
                  f"({out[mode]['server_peak_delta_x_model']:.2f}x model) receiving+aggregating 3 updates", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
