"""Refusals while the others train: wrong token, plaintext vs TLS, corrupt / oversize /
past-round updates, a stolen session, another protocol version."""

from __future__ import annotations


import grpc
import pytest
import torch

from grpc_harness import SMOKE, client_args, dev_certs, free_port, metrics, server_args

from skyfed.compression.payload import encode_payload
from skyfed.compression.wire import unpack
from skyfed.errors import SkyfedError
from skyfed.runtime.grpc import skyfed_pb2 as pb
from skyfed.runtime.grpc.auth import load_tokens
from skyfed.runtime.grpc.client import ClientOptions, FederationSession

CLIENTS = ["aws", "gcp", "azure", "eve"]


def _corrupt(payload: bytes) -> bytes:
    data = bytearray(payload)
    data[-10] ^= 0xFF  # a flipped bit in the tensor blob: only the CRC can tell
    return bytes(data)


def _expect(code: grpc.StatusCode, call) -> str:
    with pytest.raises(grpc.RpcError) as info:
        call()
    assert info.value.code() == code, info.value.details()
    return info.value.details()


def test_bad_clients_refused_while_others_train(procs, tmp_path):
    certs = dev_certs(tmp_path / "certs", CLIENTS)
    tokens = load_tokens(certs["tokens.yaml"])
    port = free_port()
    run = tmp_path / "run"
    cfg = [*SMOKE, "--set", "federation.clients=[{name: aws}, {name: gcp}, {name: azure}, {name: eve}]",
           "--set", "federation.min_clients=3", "--set", "federation.max_update_bytes=1000000"]
    procs.start("server", server_args(cfg, port, certs, run))
    for name in ["aws", "gcp", "azure"]:
        procs.start(name, client_args(name, port, certs))

    # a wrong token and a plaintext client are refused, each with one clear line and exit 2
    procs.start("intruder", ["client", "--server", f"localhost:{port}", "--name", "aws", "--ca-cert",
                             str(certs["ca.pem"]), "--token", "not-the-right-token"])
    procs.start("plaintext", ["client", "--server", f"localhost:{port}", "--name", "gcp", "--insecure",
                              "--token", tokens["gcp"], "--connect-timeout", "3"])
    assert procs.wait_exit("intruder", 120) == 2
    assert "UNAUTHENTICATED" in procs.log("intruder") and "wrong token" in procs.log("intruder")
    assert procs.wait_exit("plaintext", 120) == 2
    assert "cannot reach the skyfed server" in procs.log("plaintext") and "--ca-cert" in procs.log("plaintext")
    for label in ["intruder", "plaintext"]:
        assert "Traceback" not in procs.log(label)

    # another protocol version is refused with FAILED_PRECONDITION
    base = dict(server=f"localhost:{port}", name="eve", token=tokens["eve"], ca_cert=certs["ca.pem"], connect_timeout_s=120)
    with pytest.raises(SkyfedError, match="FAILED_PRECONDITION.*protocol version 99"):
        FederationSession(ClientOptions(**base, protocol_version=99)).register(0)

    # eve registers properly, then misbehaves from this process
    eve = FederationSession(ClientOptions(**base))
    eve.register(1000)
    pulled = eve.pull()
    assert pulled.status == "task" and pulled.task.round == 0
    params, _ = unpack(pulled.task.payload)
    delta = {n: torch.zeros_like(t) for n, t in params.items()}
    good = encode_payload(delta, kind="update", round=0, client="eve", base_version=0)
    good1 = encode_payload(delta, kind="update", round=1, client="eve", base_version=1)

    def update(round: int, size: int) -> pb.UpdateHeader:
        return pb.UpdateHeader(round=round, base_version=round, num_tokens=1000, train_loss=1.0, payload_bytes=size)

    details = _expect(grpc.StatusCode.INVALID_ARGUMENT, lambda: eve.push_raw(update(0, len(good)), _corrupt(good)))
    assert "CRC-32" in details
    # the refusal closed eve's round: a second push for it is refused, not taken
    details = _expect(grpc.StatusCode.ALREADY_EXISTS, lambda: eve.push_raw(update(0, len(good)), good))
    assert "one push per round" in details

    pulled = eve.pull()  # round 1 opens once the others have trained round 0
    assert pulled.status == "task" and pulled.task.round == 1
    details = _expect(grpc.StatusCode.RESOURCE_EXHAUSTED, lambda: eve.push_raw(update(1, 10**9), b""))
    assert "max_update_bytes" in details
    details = _expect(grpc.StatusCode.FAILED_PRECONDITION, lambda: eve.push_raw(update(5, len(good)), good))
    assert "not open" in details
    real_session = eve.session_id
    eve.session_id = "stolen-or-guessed"
    _expect(grpc.StatusCode.UNAUTHENTICATED, lambda: eve.push_raw(update(1, len(good1)), good1))
    eve.session_id = real_session
    while (pulled := eve.pull()).status != "done":
        pass
    eve.close()

    assert procs.wait_exit("server", 300) == 0, procs.logs()
    for name in ["aws", "gcp", "azure"]:
        assert procs.wait_exit(name, 60) == 0, procs.logs()
    rows = metrics(run)
    assert [r["round"] for r in rows] == [0, 1]
    assert "CRC-32" in rows[0]["rejected"]["eve"]
    assert "max_update_bytes" in rows[1]["rejected"]["eve"]
    for r in rows:
        assert r["aggregated"] and sorted(r["train_loss"]) == ["aws", "azure", "gcp"]
        assert r["bytes_up"] == sum(r["bytes_up_by_client"].values()) and "eve" not in r["bytes_up_by_client"]
    assert [r["version"] for r in rows] == [1, 2]
    server_log = procs.log("server")
    assert "wrong token" in server_log and "CRC-32" in server_log
