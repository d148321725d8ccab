"""Fuzz the server's and the client's decoders and the gRPC PushUpdate handler.

    make fuzz                                     # 10^5 inputs per target
    python bench/fuzz.py --n 2000 --out /tmp/fuzz.json

Three targets, each fed `--n` mutated inputs built from valid payloads of every codec
chain (tests/wire_mutations.py: bit flips, truncation, hostile header values such as
Infinity, NaN, 5,000-digit integers and 100k-deep arrays with the CRC recomputed so
they reach the inner parsers, hostile tensor values, bad prefix fields):

- ``decoder``: `decode_payload(..., views=True)`, as the server's engine decodes an update;
- ``downlink``: `DownlinkReceiver.receive`, as a client applies the global model or a delta;
- ``servicer``: `FederationServicer.PushUpdate` in process (tests/servicer_fuzz.py) with
  mutated calls: call metadata (missing or garbage protocol version, unknown names,
  wrong sessions, repeated keys, binary and huge values) and chunk streams (wrong header
  fields, bad framing, deep JSON in meta_json, negative or huge sizes and token counts,
  garbage messages, mutated payloads), followed by the engine's decode;
- ``grpc``: the same calls through a real gRPC server on 127.0.0.1 and a real channel
  (`--n-grpc` inputs, data chunks of 1000 bytes or more, metadata a gRPC client can
  send); an exception leaving the servicer without an abort is recorded on the server
  side and counted as foreign.

The bar: no exception other than skyfed's own errors (and, for the servicer, aborts
with a gRPC status); nothing caught by `decode_payload`'s safety net or answered
INTERNAL by the servicer's catch-all (both mean a missing check);
no input slower than `--timeout-s` (a SIGALRM per input); and the global model and the
client's model byte-identical at the end (SHA-256 of their tensors). Results go to
bench/results/fuzz.json; the exit code is 1 when the bar is not met.
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import json
import logging
import os
import platform
import random
import signal
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import grpc
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the mutators, shared with the unit tests

from servicer_fuzz import ServicerRig, hostile_stream  # noqa: E402
from wire_mutations import CHAINS, describe, mutate, random_tensors  # noqa: E402

from skyfed.compression.chain import Chain  # noqa: E402
from skyfed.compression.channel import Downlink, DownlinkReceiver  # noqa: E402
from skyfed.compression.payload import decode_payload, encode_payload  # noqa: E402
from skyfed.compression.wire import TensorSpec  # noqa: E402
from skyfed.errors import SkyfedError, WireFormatError  # noqa: E402
from skyfed.runtime.grpc import skyfed_pb2 as pb  # noqa: E402
from skyfed.runtime.grpc.rawchunks import add_servicer, push_call  # noqa: E402

MAX_BYTES = 1 << 20
SPEC = {
    "h.0.attn.weight": TensorSpec((24, 16), torch.float32),
    "h.0.attn.bias": TensorSpec((24,), torch.float32),
    "ln.weight": TensorSpec((16,), torch.float32),
}


class InputTimeout(BaseException):
    """Raised by SIGALRM in the middle of an input (BaseException: no `except Exception` hides it)."""


def _alarm(signum: int, frame: Any) -> None:
    raise InputTimeout()


def model_hash(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        h.update(name.encode())
        h.update(tensors[name].detach().contiguous().numpy().tobytes())
    return h.hexdigest()


def where(exc: BaseException) -> str:
    """file:line of the innermost skyfed frame the exception passed through."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if "skyfed" in f.filename and "/tests/" not in f.filename]
    if not frames:
        return "?"
    f = frames[-1]
    return f"{f.filename.split('/src/')[-1]}:{f.lineno} ({f.name})"


class CatchAll(Exception):
    """The servicer answered INTERNAL: its catch-all caught an exception that is not skyfed's (a missing check)."""


def checked(rig: ServicerRig, push: Callable[[], str]) -> Callable[[], str]:
    """`push`, raising `CatchAll` (with the abort's details) when the servicer answered INTERNAL."""

    def run() -> str:
        outcome = push()
        if outcome == "aborted:INTERNAL":
            raise CatchAll(rig.last_abort)
        return outcome

    return run


class Tally:
    """Counts and examples for one target."""

    def __init__(self, name: str):
        self.name = name
        self.inputs = 0
        self.outcomes: collections.Counter[str] = collections.Counter()
        self.by_mutation: collections.Counter[str] = collections.Counter()
        self.exceptions: collections.Counter[str] = collections.Counter()
        self.foreign: collections.Counter[str] = collections.Counter()
        self.safety_net: collections.Counter[str] = collections.Counter()
        self.catch_all: collections.Counter[str] = collections.Counter()  # the servicer's INTERNAL answers
        self.escaped_project: collections.Counter[str] = collections.Counter()
        self.hangs = 0
        self.times: list[float] = []
        self.slowest: list[tuple[float, str, int]] = []  # (seconds, mutation, input bytes), the 5 slowest
        self.examples: dict[str, dict] = {}

    def example(self, key: str, mutation: str, exc: BaseException, data: Any) -> None:
        if key not in self.examples:
            excerpt = describe(data) if isinstance(data, (bytes, bytearray)) else str(data)[:300]
            self.examples[key] = {"mutation": mutation, "exception": type(exc).__name__, "message": str(exc)[:300],
                                  "raised_at": where(exc), "input": excerpt}

    def run(self, mutation: str, data: Any, fn: Callable[[], str], timeout_s: float) -> None:
        self.inputs += 1
        self.by_mutation[mutation] += 1
        start = time.perf_counter()
        signal.setitimer(signal.ITIMER_REAL, timeout_s)
        try:
            self.outcomes[fn()] += 1
        except InputTimeout as exc:
            self.hangs += 1
            self.example(f"hang:{mutation}", mutation, exc, data)
        except WireFormatError as exc:
            cause = exc.__cause__
            if cause is not None and not isinstance(cause, WireFormatError):  # decode_payload's safety net
                key = f"{type(cause).__name__} at {where(cause)}"
                self.safety_net[key] += 1
                self.example(f"net:{key}", mutation, cause, data)
            self.exceptions[type(exc).__name__] += 1
            self.outcomes["refused"] += 1
            if self.name == "servicer":
                self.escaped_project[f"{type(exc).__name__} at {where(exc)}"] += 1
                self.example(f"escaped:{where(exc)}", mutation, exc, data)
        except CatchAll as exc:
            self.catch_all[str(exc)[:200]] += 1
            self.outcomes["aborted:INTERNAL"] += 1
            self.example(f"catch_all:{exc}", mutation, exc, data)
        except SkyfedError as exc:
            self.exceptions[type(exc).__name__] += 1
            self.outcomes["refused"] += 1
            if self.name == "servicer":
                self.escaped_project[f"{type(exc).__name__} at {where(exc)}"] += 1
                self.example(f"escaped:{where(exc)}", mutation, exc, data)
        except Exception as exc:
            key = f"{type(exc).__name__} at {where(exc)}"
            self.foreign[key] += 1
            self.example(f"foreign:{key}", mutation, exc, data)
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            elapsed = time.perf_counter() - start
            self.times.append(elapsed)
            if len(self.slowest) < 5 or elapsed > self.slowest[-1][0]:
                size = len(data) if isinstance(data, (bytes, bytearray)) else 0
                self.slowest = sorted([*self.slowest, (elapsed, mutation, size)], reverse=True)[:5]

    def summary(self) -> dict:
        times = sorted(self.times) or [0.0]
        return {
            "inputs": self.inputs,
            "outcomes": dict(self.outcomes.most_common()),
            "exceptions_by_type": dict(self.exceptions.most_common()),
            "foreign_exceptions": sum(self.foreign.values()),
            "foreign_by_type_and_line": dict(self.foreign.most_common()),
            "safety_net_catches": sum(self.safety_net.values()),
            "safety_net_by_type_and_line": dict(self.safety_net.most_common()),
            "servicer_catch_all_internal": sum(self.catch_all.values()),
            "servicer_catch_all_by_details": dict(self.catch_all.most_common()),
            "project_errors_escaping_without_status": dict(self.escaped_project.most_common()),
            "hangs": self.hangs,
            "max_s_per_input": times[-1],
            "p99_s_per_input": times[int(0.99 * (len(times) - 1))],
            "mean_s_per_input": sum(times) / len(times),
            "slowest_inputs": [{"s": t, "mutation": m, "bytes": b} for t, m, b in self.slowest],
            "inputs_by_mutation": dict(sorted(self.by_mutation.items())),
            "examples": list(self.examples.values())[:20],
        }

    @property
    def ok(self) -> bool:
        return not self.foreign and not self.safety_net and not self.catch_all and not self.hangs


def update_sources(rng: random.Random) -> list[tuple[dict[str, torch.Tensor], Chain]]:
    """(tensors, chain) of SPEC for every chain: the servicer targets encode them for each push's round."""
    return [(random_tensors(rng, SPEC), Chain.from_specs(c)) for c in CHAINS]


def update_payloads(rng: random.Random, per_chain: int = 3) -> list[bytes]:
    """Valid updates of SPEC through every chain."""
    return [
        encode_payload(random_tensors(rng, SPEC), Chain.from_specs(c), kind="update", round=0, client="aws", base_version=0)
        for c in CHAINS for _ in range(per_chain)
    ]


def fuzz_decoder(rng: random.Random, n: int, timeout_s: float) -> Tally:
    tally, payloads = Tally("decoder"), update_payloads(rng)
    for _ in range(n):
        mutation, data = mutate(rng, rng.choice(payloads))

        def decode() -> str:
            tensors, _ = decode_payload(data, SPEC, MAX_BYTES, "update from aws", views=True)
            return "accepted"

        tally.run(mutation, data, decode, timeout_s)
    return tally


def fuzz_downlink(rng: random.Random, n: int, timeout_s: float, initial: dict[str, torch.Tensor]) -> Tally:
    tally = Tally("downlink")
    payloads = []
    gen = torch.Generator().manual_seed(rng.randrange(2**31))  # seeded: the same inputs every run
    for c in CHAINS:  # a first payload (model or delta against the initial model) per chain
        down = Downlink(Chain.from_specs(c), SPEC)
        params = {k: v + 0.01 * torch.randn(v.shape, generator=gen) for k, v in initial.items()}
        payloads.append(down.payload_for("aws", params, round=1, version=1))
        payloads.append(down.payload_for("gcp", params, round=1, version=1))
    for _ in range(n):
        mutation, data = mutate(rng, rng.choice(payloads))

        def receive() -> str:
            DownlinkReceiver(initial).receive(data, SPEC, MAX_BYTES)
            return "accepted"

        tally.run(mutation, data, receive, timeout_s)
    return tally


def fuzz_servicer(rng: random.Random, n: int, timeout_s: float) -> Tally:
    tally, sources = Tally("servicer"), update_sources(rng)
    rig = ServicerRig(SPEC)
    try:
        for _ in range(n):
            kind, chunks, metadata = hostile_stream(rng, rig, rig.update(*rng.choice(sources)))
            tally.run(kind, _describe_call(metadata, chunks), checked(rig, lambda: rig.push(chunks, metadata=metadata)), timeout_s)
    finally:
        rig.close()
    tally.outcomes["decoded_by_engine"] = rig.decoded
    return tally


def _describe_call(metadata: list[tuple[str, Any]], chunks: list[bytes]) -> bytes:
    """The call's metadata (values cut to 40 characters) and its first three messages."""
    meta = ";".join(f"{k}={str(v)[:40]}{'...' if len(str(v)) > 40 else ''}" for k, v in metadata[:6])
    return meta.encode() + b"||" + b"|".join(chunks[:3])


class Recorder:
    """Wraps a servicer for a real gRPC server: records an exception that leaves
    PushUpdate without an abort (grpc would answer UNKNOWN and log a traceback)."""

    def __init__(self, servicer: Any):
        self.servicer = servicer
        self.escaped: BaseException | None = None
        self.Register, self.PullTask = servicer.Register, servicer.PullTask

    def PushUpdate(self, request_iterator: Any, context: grpc.ServicerContext) -> pb.PushReply:
        try:
            return self.servicer.PushUpdate(request_iterator, context)
        except Exception as exc:
            if context.code() is None and context.is_active():  # not an abort, nor a cancelled call
                self.escaped = exc
            raise


def fuzz_grpc(rng: random.Random, n: int, timeout_s: float) -> Tally:
    from concurrent.futures import ThreadPoolExecutor

    tally, sources = Tally("servicer"), update_sources(rng)
    rig = ServicerRig(SPEC)
    recorder = Recorder(rig.servicer)
    server = grpc.server(ThreadPoolExecutor(max_workers=2))
    add_servicer(recorder, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    push = push_call(channel)

    def call(chunks: list[bytes], metadata: list[tuple[str, Any]]) -> str:
        recorder.escaped = None
        try:
            reply = push(iter(chunks), timeout=timeout_s, metadata=metadata)
            outcome = "duplicate" if reply.duplicate else "accepted" if reply.accepted else "rejected"
        except grpc.RpcError as err:
            outcome = f"aborted:{err.code().name}"
            rig.last_abort = err.details() or ""
        if recorder.escaped is not None:
            raise recorder.escaped
        return outcome

    try:
        for _ in range(n):
            kind, chunks, metadata = hostile_stream(rng, rig, rig.update(*rng.choice(sources)), tiny_chunks=False, wire_safe=True)
            tally.run(kind, _describe_call(metadata, chunks), checked(rig, lambda: rig.push(chunks, call, metadata)), timeout_s)
    finally:
        channel.close()
        server.stop(None)
        rig.close()
    tally.outcomes["decoded_by_engine"] = rig.decoded
    return tally


def command(argv: list[str] | None) -> str:
    """The command line that wrote the results (with PYTHONPATH, which picks the skyfed tree)."""
    env = f"PYTHONPATH={os.environ['PYTHONPATH']} " if os.environ.get("PYTHONPATH") else ""
    return env + "python bench/fuzz.py " + " ".join(sys.argv[1:] if argv is None else argv)


def source() -> dict:
    """Which skyfed was fuzzed: its directory and that checkout's git commit."""
    import subprocess

    import skyfed

    path = Path(skyfed.__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "-C", str(path), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = bool(subprocess.run(["git", "-C", str(path), "status", "--porcelain", "--", "."], capture_output=True, text=True, timeout=10).stdout.strip())
    except (OSError, subprocess.SubprocessError):
        commit, dirty = "", False
    return {"path": str(path), "commit": commit, "uncommitted_changes": dirty}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=100_000, help="inputs per target")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout-s", type=float, default=5.0, help="a slower input counts as a hang")
    ap.add_argument("--n-grpc", type=int, default=None, help="inputs through a real gRPC server (default: n / 10)")
    ap.add_argument("--targets", default="decoder,downlink,servicer,grpc")
    ap.add_argument("--out", type=Path, default=ROOT / "bench/results/fuzz.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    logging.disable(logging.CRITICAL)  # a refusal logs a line per input
    signal.signal(signal.SIGALRM, _alarm)
    rng = random.Random(args.seed)
    load_before = os.getloadavg()
    gen = torch.Generator().manual_seed(args.seed)
    params = {k: torch.randn(s.shape, generator=gen) for k, s in SPEC.items()}  # the server's global model
    client_model = {k: torch.randn(s.shape, generator=gen) for k, s in SPEC.items()}  # a client's model
    hashes = (model_hash(params), model_hash(client_model))
    started = time.perf_counter()
    targets = {}
    for name in args.targets.split(","):
        t0 = time.perf_counter()
        if name == "decoder":
            tally = fuzz_decoder(rng, args.n, args.timeout_s)
        elif name == "downlink":
            tally = fuzz_downlink(rng, args.n, args.timeout_s, client_model)
        elif name == "servicer":
            tally = fuzz_servicer(rng, args.n, args.timeout_s)
        elif name == "grpc":
            tally = fuzz_grpc(rng, args.n // 10 if args.n_grpc is None else args.n_grpc, args.timeout_s)
        else:
            raise SystemExit(f"unknown target {name!r}: decoder, downlink, servicer or grpc")
        targets[name] = dict(tally.summary(), ok=tally.ok, elapsed_s=time.perf_counter() - t0)
        print(f"{name}: {tally.inputs} inputs, {sum(tally.foreign.values())} foreign, "
              f"{sum(tally.safety_net.values())} safety-net, {sum(tally.catch_all.values())} INTERNAL, {tally.hangs} hangs, max {max(tally.times):.3f} s", flush=True)
    unchanged = (model_hash(params), model_hash(client_model)) == hashes
    ok = unchanged and all(t["ok"] for t in targets.values())
    result = {
        "benchmark": "fuzz",
        "command": command(argv),
        "skyfed_source": source(),
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
                    "threads": torch.get_num_threads(), "cpus": os.cpu_count()},
        "load_avg_before": load_before,
        "load_avg_after": os.getloadavg(),
        "seed": args.seed,
        "inputs_per_target": {name: t["inputs"] for name, t in targets.items()},
        "timeout_s": args.timeout_s,
        "elapsed_s": time.perf_counter() - started,
        "models_byte_identical": unchanged,
        "ok": ok,
        "targets": targets,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "targets"}, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
