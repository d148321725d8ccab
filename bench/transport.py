"""Benchmark: move a 100M-parameter fp32 update (400 MB) client -> server through skyfed's
gRPC path, against a plain TCP socket copy and a TLS socket copy of the same bytes on
loopback, in the same run; and the server's peak memory while receiving and aggregating
3 such updates, fp32 and int8.

    PYTHONPATH=src python bench/transport.py --out bench/results/transport.json   # 100M params, 1 MiB chunks
    PYTHONPATH=src python bench/transport.py --params 10000000 --out /tmp/t.json  # quicker

The server is a subprocess running skyfed's real servicer (`FederationServicer` +
`GrpcTransport` with the channel options of `runtime/grpc/security.py`: header checks;
framing, CRC-32 and a plain update's tensors and values checked as the chunks arrive,
on a helper thread; an update of at least `federation.spill_min_bytes` received into a
spill file) and the engine's
`SyncLoop.collect` with FedAvg (validate each update, fold it into the running mean,
publish the step; only the evaluation and the checkpoint of `run_round` are left out).
The client is skyfed's `FederationSession.push_raw` (chunks of skyfed server's default size). The gRPC time runs
from the first byte sent until the server has answered the push: the update is then
received, checked in full (framing, CRC-32, names, shapes, values) and taken into the
round (its fold into the running sum runs after the answer, while the next upload
arrives). Baselines in the same server process: the same bytes over one plain TCP socket
into a preallocated buffer, and (TLS mode) over one TLS socket (Python's `ssl`, the same
certificate and loopback) into a preallocated buffer: no framing, no checks.
`throughput_ratio` is against the plain TCP copy in both modes (the key the checks
read), best transfer against best transfer over `--repeats` of each (timeit's
convention: the fastest run is the one least disturbed by the rest of the machine);
`throughput_ratio_median` compares the medians; `throughput_ratio_vs_tls_socket`
compares TLS with TLS.

Memory: peak RSS (VmHWM, reset with /proc/self/clear_refs after each round's socket copies) of
the server process while its 3 clients upload one after the other and the round is
aggregated, above the RSS the server has before the first update arrives (imports and
the global model included, the running sum not). A spilled update lives in the page
cache (a file), not in the process. `int8` repeats the fp32 plaintext run with an
int8-encoded update (`[int8]`, block 256: 1.02 bytes a parameter). The JSON records
the command and the load average before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from concurrent import futures
from pathlib import Path

from procfs import reset_peak, status_bytes

ROOT = Path(__file__).resolve().parents[1]
CLIENTS = ["c0", "c1", "c2"]
STEPS = 1000  # local steps of the bench's tasks: the token counts it claims stay within them


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
    overrides = [f"federation.max_update_bytes={max_bytes}", "federation.round_timeout_s=600"]
    if args.spill_min_mib is not None:
        overrides.append(f"federation.spill_min_bytes={int(args.spill_min_mib * 2**20)}")
    cfg = load_config(preset="smoke", overrides=overrides)
    transport = GrpcTransport(CLIENTS)
    servicer = FederationServicer(transport, "", {}, None, max_bytes, chunk)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8), options=server_options(chunk) + extra_options(args))
    add_servicer(servicer, server)
    certs = None if args.certs is None else Path(args.certs)
    creds = None if certs is None else server_credentials(certs / "server.pem", certs / "server.key", None, False)
    port = server.add_insecure_port("127.0.0.1:0") if creds is None else server.add_secure_port("127.0.0.1:0", creds)
    server.start()
    copies = []
    tcp = socket_receiver(None, copies)
    tls = socket_receiver(certs, copies) if certs is not None else None
    model = torch.nn.Module()
    model.w = torch.nn.Parameter(torch.zeros(args.params), requires_grad=False)
    evaluator = None  # collect does not evaluate
    engine = Engine(cfg, transport, model, ["w"], build_strategy("fedavg"), evaluator, RunDir(tempfile.mkdtemp()))
    engine.stream_aggregate = not args.buffered
    transport.blob_check = engine.core.blob_check  # as `run_server` does
    if engine.stream_aggregate:
        transport.spill_min_bytes, transport.spill_dir = cfg.federation.spill_min_bytes, cfg.federation.spill_dir
    ports = {"grpc": port, "tcp": tcp.getsockname()[1], "tls": tls.getsockname()[1] if tls is not None else None}
    Path(args.port_file).write_text(json.dumps(ports))
    per_round = 1 if tls is None else 2
    base = peak = None
    for round in range(args.rounds):
        while len(copies) < (round + 1) * per_round:  # the round's socket copies run first, outside the measurement
            time.sleep(0.05)
        reset_peak()
        if base is None:
            base = status_bytes("VmRSS")
        tasks = {c: TrainTask(round, engine.version, b"", STEPS) for c in CLIENTS}
        for c, task in tasks.items():
            transport.send(c, task)
        w = Window(round, list(CLIENTS))
        waiting = engine.loop.collect(w, tasks)
        assert w.aggregated and not w.rejected and not waiting, (w.rejected, waiting)
        results = [{"client": c, "bytes": w.bytes_up[c], "weight": w.extra["weights"][c]} for c in w.accepted]
        peak = max(peak or 0, status_bytes("VmHWM"))
        Path(f"{args.port_file}.round{round}").touch()  # the client's next socket copies may start
    print(json.dumps({"baseline_rss": base, "peak_hwm": peak, "peak_delta": peak - base, "folds": results,
                      "streamed": engine.stream_aggregate, "spill_min_bytes": transport.spill_min_bytes,
                      "global_mean": float(engine.params["w"].mean())}), flush=True)
    server.stop(0)


def socket_receiver(certs: Path | None, done: list) -> socket.socket:
    """A listening socket (TLS with the server certificate when `certs`) whose thread
    reads each connection's bytes into a preallocated buffer and answers one byte."""
    import ssl

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(1)
    ctx = None
    if certs is not None:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(certs / "server.pem", certs / "server.key")

    def receive() -> None:
        while True:
            raw, _ = sock.accept()
            with (ctx.wrap_socket(raw, server_side=True) if ctx is not None else raw) as conn:
                head = bytearray(8)
                got = 0
                while got < 8:
                    got += conn.recv_into(memoryview(head)[got:])
                size = int.from_bytes(head, "little")
                buf = bytearray(size)
                view, pos = memoryview(buf), 0
                while pos < size:
                    n = conn.recv_into(view[pos:], min(size - pos, 16 * 2**20))
                    if n == 0:
                        break
                    pos += n
                conn.sendall(b"\x01")
                del view, buf
                done.append(pos)

    threading.Thread(target=receive, daemon=True).start()
    return sock


def extra_options(args: argparse.Namespace) -> list[tuple[str, int]]:
    """--grpc-option NAME=INT, for trying channel options on both sides."""
    return [(k, int(v)) for k, _, v in (o.partition("=") for o in args.grpc_option)]


# ---------------------------------------------------------------- client side


def start_server(args: argparse.Namespace, certs: str | None, rounds: int, tmp: Path):
    port_file = tmp / f"ports-{time.monotonic_ns()}.json"
    cmd = [sys.executable, __file__, "--serve", "--port-file", str(port_file), "--params", str(args.params),
           "--chunk-mib", str(args.chunk_mib), "--rounds", str(rounds)] + (["--certs", certs] if certs else []) \
        + (["--buffered"] if args.buffered else []) + [f"--grpc-option={o}" for o in args.grpc_option] \
        + ([f"--spill-min-mib={args.spill_min_mib}"] if args.spill_min_mib is not None else [])
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, env=env)
    for _ in range(1200):
        if port_file.exists() and port_file.stat().st_size:
            ports = json.loads(port_file.read_text())
            ports["round_done"] = str(port_file) + ".round{}"  # the server touches it when a round is measured
            return proc, ports
        if proc.poll() is not None:
            raise SystemExit("bench server failed to start")
        time.sleep(0.1)
    raise SystemExit("bench server did not start")


def session(args: argparse.Namespace, name: str, port: int, certs: str | None):
    from skyfed.runtime.grpc.client import ClientOptions, FederationSession

    from skyfed.runtime.grpc import client as client_mod

    opts = ClientOptions(f"localhost:{port}", name, "", insecure=certs is None,
                         ca_cert=None if certs is None else Path(certs) / "ca.pem")
    base = client_mod.channel_options
    client_mod.channel_options = lambda chunk: base(chunk) + extra_options(args)
    try:
        s = FederationSession(opts, int(args.chunk_mib * 2**20))
    finally:
        client_mod.channel_options = base
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


def socket_copy(port: int, payload: bytes, ca: Path | None) -> float:
    """Seconds to send `payload` over a new socket (TLS when `ca`) and get the answer byte."""
    import ssl

    t0 = time.perf_counter()
    raw = socket.create_connection(("127.0.0.1", port))
    if ca is not None:
        ctx = ssl.create_default_context(cafile=str(ca))
        raw = ctx.wrap_socket(raw, server_hostname="localhost")
    with raw as s:
        s.sendall(len(payload).to_bytes(8, "little"))
        s.sendall(payload)
        assert s.recv(1) == b"\x01"
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--params", type=int, default=100_000_000)
    p.add_argument("--chunk-mib", type=float, help="stream chunk size (default: skyfed server's)")
    p.add_argument("--repeats", type=int, default=10, help="transfers per path; the best is reported, the median too")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "transport.json"))
    p.add_argument("--modes", default="insecure,tls,int8", help="which of insecure, tls, int8 to run")
    p.add_argument("--buffered", action="store_true", help="aggregate the round's list of updates instead of folding (for comparison)")
    p.add_argument("--spill-min-mib", type=float, help="federation.spill_min_bytes in MiB (default: the config's)")
    p.add_argument("--grpc-option", action="append", default=[], metavar="NAME=INT", help="extra gRPC channel option, both sides")
    p.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--port-file", help=argparse.SUPPRESS)
    p.add_argument("--certs", help=argparse.SUPPRESS)
    p.add_argument("--rounds", type=int, default=1, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.chunk_mib is None:
        from skyfed.runtime.grpc import DEFAULT_CHUNK_BYTES

        args.chunk_mib = DEFAULT_CHUNK_BYTES / 2**20
    if args.serve:
        return serve(args)

    import tempfile

    import torch

    from skyfed.compression.chain import Chain
    from skyfed.compression.payload import encode_payload
    from skyfed.runtime.grpc.certs import make_dev_certs
    from skyfed.runtime.grpc.security import server_options

    torch.set_num_threads(1)
    delta = {"w": torch.rand(args.params)}
    payloads = {"fp32": encode_payload(delta, kind="update", round=0, client="c0")}
    modes = args.modes.split(",")
    if "int8" in modes:
        payloads["int8"] = encode_payload(delta, Chain.from_specs(["int8"]), kind="update", round=0, client="c0")
    del delta
    out: dict = {"command": " ".join(["python", "bench/transport.py", *sys.argv[1:]]), "loadavg_start": list(os.getloadavg()),
                 "params": args.params, "payload_bytes": len(payloads["fp32"]), "chunk_bytes": int(args.chunk_mib * 2**20),
                 "repeats": args.repeats, "cpu_count": os.cpu_count(), "grpc_options": args.grpc_option,
                 "server_options": dict(server_options(int(args.chunk_mib * 2**20))),
                 "aggregation": "buffered" if args.buffered else "streamed"}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        make_dev_certs(tmp / "certs", CLIENTS, ["localhost", "127.0.0.1"])
        for mode in modes:
            certs = str(tmp / "certs") if mode == "tls" else None
            payload = payloads["int8" if mode == "int8" else "fp32"]
            size = len(payload)
            rounds = args.repeats
            proc, ports = start_server(args, certs, rounds, tmp)
            sessions = [session(args, c, ports["grpc"], certs) for c in CLIENTS]
            grpc_s, tcp_s, tls_s = [], [], []
            for r in range(rounds):
                # the baselines run just before each gRPC round, so all paths see the same machine,
                # once the server has aggregated and measured the round before (outside the timing)
                while r and not Path(ports["round_done"].format(r - 1)).exists():
                    time.sleep(0.01)
                tcp_s.append(socket_copy(ports["tcp"], payload, None))
                if certs is not None:
                    tls_s.append(socket_copy(ports["tls"], payload, tmp / "certs" / "ca.pem"))
                for i, s in enumerate(sessions):
                    while (task := s.pull()).status != "task" or task.task.round != r:
                        pass  # the round's task opens the round for this client (untimed)
                    dt = push(s, payload, r, 1000 * (i + 1))
                    if i == 0:
                        grpc_s.append(dt)
            server_out, _ = proc.communicate(timeout=600)
            mem = json.loads(server_out.decode().strip().splitlines()[-1])
            best_grpc, best_tcp = min(grpc_s), min(tcp_s)
            row = out[mode] = {
                "payload_bytes": size,
                "grpc_s": grpc_s, "tcp_s": tcp_s,
                "grpc_MBps": size / best_grpc / 1e6, "tcp_MBps": size / best_tcp / 1e6,
                "throughput_ratio": best_tcp / best_grpc,
                "throughput_ratio_median": statistics.median(tcp_s) / statistics.median(grpc_s),
                "server_peak_delta_bytes": mem["peak_delta"],
                "server_peak_delta_x_model": mem["peak_delta"] / (4 * args.params),
                "server_baseline_rss_bytes": mem["baseline_rss"],
                "spill_min_bytes": mem["spill_min_bytes"],
                "folds": mem["folds"],
            }
            if tls_s:
                row.update(tls_socket_s=tls_s, tls_socket_MBps=size / min(tls_s) / 1e6,
                           throughput_ratio_vs_tls_socket=min(tls_s) / best_grpc)
            for s in sessions:
                s.close()
            vs_tls = f", TLS socket {row['tls_socket_MBps']:.0f} MB/s, ratio vs TLS socket {row['throughput_ratio_vs_tls_socket']:.2f}" if tls_s else ""
            print(f"{mode:>8}: gRPC {row['grpc_MBps']:.0f} MB/s, TCP {row['tcp_MBps']:.0f} MB/s, "
                  f"ratio {row['throughput_ratio']:.2f} (median {row['throughput_ratio_median']:.2f}){vs_tls}; server peak +{mem['peak_delta'] / 1e9:.2f} GB "
                  f"({row['server_peak_delta_x_model']:.2f}x model) receiving+aggregating 3 updates", flush=True)
    out["loadavg_end"] = list(os.getloadavg())
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out} (load average {out['loadavg_start'][0]:.1f} -> {out['loadavg_end'][0]:.1f})")


if __name__ == "__main__":
    main()
