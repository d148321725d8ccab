"""End-to-end refusals at the server's front door, with a real `skyfed server` and real
`skyfed client` processes: the server will not start without tokens unless `--open`;
a certificate for one name used with another; a missing or wrong token; a flood of
streams that never send while legitimate clients register and train; an oversized
announcement (the server's peak memory is measured); a duplicate and a replayed push."""

from __future__ import annotations

import threading
from collections import Counter
from pathlib import Path

import grpc
import pytest
import torch

from conftest import run_cli
from grpc_harness import SMOKE, client_args, dev_certs, free_port, metrics, server_args

from skyfed.compression.payload import encode_payload
from skyfed.compression.wire import unpack
from skyfed.errors import AuthError
from skyfed.runtime.grpc import PROTOCOL_VERSION, skyfed_pb2 as pb
from skyfed.runtime.grpc.auth import call_metadata, load_tokens
from skyfed.runtime.grpc.client import ClientOptions, FederationSession
from skyfed.runtime.grpc.rawchunks import SERVICE

Code = grpc.StatusCode


def test_server_needs_tokens_or_an_explicit_open_flag(tmp_path):
    proc = run_cli("server", "--preset", "smoke", "--insecure", "--listen", "127.0.0.1:0", "--out", str(tmp_path / "run"), timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "--tokens" in lines[0] and "--open" in lines[0], proc.stderr
    assert not (tmp_path / "run").exists()  # refused before anything was prepared
    tokens = tmp_path / "tokens.yaml"
    tokens.write_text("aws: aws-secret-token\n")
    proc = run_cli("server", "--preset", "smoke", "--insecure", "--open", "--tokens", str(tokens), "--listen", "127.0.0.1:0", timeout=120)
    assert proc.returncode == 2 and "contradict" in proc.stderr


def _vm(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise AssertionError(field)


def _expect(code: grpc.StatusCode, call) -> str:
    with pytest.raises(grpc.RpcError) as info:
        call()
    assert info.value.code() == code, info.value.details()
    return info.value.details()


class Flood:
    """Streams that never send a message, opened over and over from one raw channel."""

    def __init__(self, channel: grpc.Channel, eve_session: str):
        self.channel = channel
        self.eve = eve_session
        self.stop = threading.Event()
        self.futures: list[tuple[str, grpc.Future]] = []
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _silent(self):
        self.stop.wait(120)
        return
        yield b""

    def _open(self, kind: str, method: str, metadata) -> None:
        call = self.channel.stream_unary(f"/{SERVICE}/{method}")
        self.futures.append((kind, call.future(self._silent(), metadata=metadata, timeout=120)))

    def _run(self, bursts: int = 15) -> None:
        for _ in range(bursts):  # 30 streams every 2 s, until the legitimate clients are through
            for _ in range(10):
                self._open("anonymous", "PushUpdate", None)
                self._open("no token", "Register", call_metadata(PROTOCOL_VERSION, "aws"))
                self._open("eve", "PushUpdate", call_metadata(PROTOCOL_VERSION, "eve", session=self.eve))
            if self.stop.wait(2.0):
                return

    def codes(self) -> dict[str, Counter]:
        out: dict[str, Counter] = {}
        for kind, fut in self.futures:
            out.setdefault(kind, Counter())[fut.exception(timeout=60).code()] += 1
        return out


def test_front_door_refusals_while_others_train(procs, tmp_path):
    names = ["aws", "gcp", "eve"]
    certs = dev_certs(tmp_path / "certs", names)
    tokens = load_tokens(certs["tokens.yaml"])
    port = free_port()
    run = tmp_path / "run"
    cfg = [*SMOKE, "--set", "federation.clients=[{name: aws}, {name: gcp}, {name: eve}]", "--set", "federation.rounds=3",
           "--set", "federation.min_clients=2", "--set", "federation.round_timeout_s=120"]
    procs.start("server", server_args(cfg, port, certs, run, "--client-ca", str(certs["ca.pem"]),
                                      "--idle-timeout", "2", "--max-calls-per-client", "2"))

    def session(name: str, cert: str, token: str) -> FederationSession:
        return FederationSession(ClientOptions(
            f"localhost:{port}", name, token, ca_cert=certs["ca.pem"], tls_cert=certs[f"client-{cert}.pem"],
            tls_key=certs[f"client-{cert}.key"], connect_timeout_s=240, max_backoff_s=1))

    # identities: aws's certificate claiming gcp (with gcp's own token); no token; a wrong token
    with pytest.raises(AuthError, match="issued to aws, not 'gcp'"):
        session("gcp", "aws", tokens["gcp"]).register(0)
    for token in ["", "not-eves-token"]:
        with pytest.raises(AuthError, match="wrong token"):
            session("eve", "eve", token).register(0)
    eve = session("eve", "eve", tokens["eve"])
    eve.register(1000)

    # a flood of streams that never send, while aws and gcp register and train round 0
    flood = Flood(eve.channel, eve.session_id)
    flood.thread.start()
    for name in ["aws", "gcp"]:
        procs.start(name, client_args(name, port, certs, "--tls-cert", str(certs[f"client-{name}.pem"]),
                                      "--tls-key", str(certs[f"client-{name}.key"])))
    procs.wait_for("aws and gcp to push round 0 under the flood, and the watchdog to cancel a stream", lambda: all(
        f"received the round 0 update of {n}" in procs.log("server") for n in ["aws", "gcp"])
        and "sent or took nothing for 2s" in procs.log("server"))
    flood.stop.set()
    flood.thread.join(30)
    codes = flood.codes()
    assert set(codes["anonymous"]) <= {Code.FAILED_PRECONDITION, Code.RESOURCE_EXHAUSTED}, codes
    assert set(codes["no token"]) <= {Code.UNAUTHENTICATED, Code.RESOURCE_EXHAUSTED}, codes
    assert codes["anonymous"][Code.FAILED_PRECONDITION] >= 10 and codes["no token"][Code.UNAUTHENTICATED] >= 10, codes
    # eve's own streams: at most 2 at a time get in (then the watchdog cancels them), the rest are refused
    # (INVALID_ARGUMENT: a stream still held when the flood stopped, closed without its header)
    assert set(codes["eve"]) <= {Code.RESOURCE_EXHAUSTED, Code.CANCELLED, Code.INVALID_ARGUMENT}, codes
    assert codes["eve"][Code.RESOURCE_EXHAUSTED] >= 8 and codes["eve"][Code.CANCELLED] >= 1, codes
    assert "sent or took nothing for 2s" in procs.log("server")

    # round 0: three concurrent 2 GiB announcements; the server's peak memory does not move
    task = eve.pull()
    assert task.status == "task" and task.task.round == 0
    pid = procs.pid("server")
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current RSS
    before = _vm(pid, "VmRSS")
    huge = pb.UpdateHeader(round=0, base_version=task.task.version, num_tokens=100, payload_bytes=2 * 2**30)
    results: list[grpc.RpcError] = []

    def announce():
        try:
            eve.push_raw(huge, b"")
        except grpc.RpcError as err:
            results.append(err)

    threads = [threading.Thread(target=announce) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    peak = _vm(pid, "VmHWM")
    assert peak - before < 64 * 2**20, (before, peak)  # 6 GiB announced
    got = Counter(e.code() for e in results)
    assert got[Code.RESOURCE_EXHAUSTED] >= 1 and set(got) <= {Code.RESOURCE_EXHAUSTED, Code.ABORTED, Code.ALREADY_EXISTS}, got
    assert any("largest update this model and uplink codec chain can produce" in e.details() for e in results)

    # round 1: a good push is taken once; the same push again is refused
    task = eve.pull()
    assert task.status == "task" and task.task.round == 1
    params, _ = unpack(task.task.payload)
    zeros = {n: torch.zeros_like(t) for n, t in params.items()}
    v1 = task.task.version
    good = encode_payload(zeros, kind="update", round=1, client="eve", base_version=v1)
    header = pb.UpdateHeader(round=1, base_version=v1, num_tokens=100, train_loss=1.0, payload_bytes=len(good))
    assert eve.push_raw(header, good).accepted
    assert "one push per round" in _expect(Code.ALREADY_EXISTS, lambda: eve.push_raw(header, good))

    # round 2: the round-1 update replayed with a header saying round 2; a push for a round never sent
    task = eve.pull()
    assert task.status == "task" and task.task.round == 2
    v2 = task.task.version
    assert "not open" in _expect(Code.FAILED_PRECONDITION, lambda: eve.push_raw(
        pb.UpdateHeader(round=7, base_version=v2, num_tokens=100, payload_bytes=len(good)), good))
    replay = pb.UpdateHeader(round=2, base_version=v2, num_tokens=100, train_loss=1.0, payload_bytes=len(good))
    assert "header says round=1" in _expect(Code.INVALID_ARGUMENT, lambda: eve.push_raw(replay, good))
    while eve.pull().status != "done":
        pass
    eve.close()

    assert procs.wait_exit("server", 300) == 0, procs.logs()
    for name in ["aws", "gcp"]:
        assert procs.wait_exit(name, 60) == 0, procs.logs()
    rows = metrics(run)
    assert [r["round"] for r in rows] == [0, 1, 2] and all(r["aggregated"] for r in rows)
    assert "can produce" in rows[0]["rejected"]["eve"]
    assert sorted(rows[1]["train_loss"]) == ["aws", "eve", "gcp"] and not rows[1]["rejected"]
    assert "replayed" in rows[2]["rejected"]["eve"]
    server_log = procs.log("server")
    assert "Traceback" not in server_log
    assert "issued to aws, not 'gcp'" in server_log and "wrong token" in server_log
