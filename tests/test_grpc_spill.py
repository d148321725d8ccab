"""The gRPC server receiving updates into spill files and folding them slab by slab, in
process: real servicer, transport, gRPC channels and the engine's `SyncLoop.collect`.
A corrupt update (a flipped bit in its last chunk, NaN in its last value) is refused
with the running sum untouched, and no spill file is left behind."""

from __future__ import annotations

import threading
from concurrent import futures

import grpc
import pytest
import torch

from skyfed.compression.chain import Chain
from skyfed.compression.payload import decode_payload, encode_payload
from skyfed.compression.wire import TensorSpec
from skyfed.config import load_config
from skyfed.federation.engine import Engine
from skyfed.federation.messages import TrainTask
from skyfed.federation.strategies import build_strategy
from skyfed.federation.strategies.aggregate import weighted_mean
from skyfed.federation.window import Window
from skyfed.metrics import RunDir
from skyfed.runtime.grpc import skyfed_pb2 as pb
from skyfed.runtime.grpc.client import ClientOptions, FederationSession
from skyfed.runtime.grpc.rawchunks import add_servicer
from skyfed.runtime.grpc.security import server_options
from skyfed.runtime.grpc.servicer import FederationServicer
from skyfed.runtime.grpc.transport import GrpcTransport

CLIENTS = ["aws", "gcp", "azure"]
SPEC = {"w": TensorSpec((50_000,), torch.float32), "b": TensorSpec((300,), torch.float32)}
CHUNK = 16 * 2**10
TOKENS = {"aws": 100, "gcp": 300, "azure": 600}


class _Model(torch.nn.Module):
    def __init__(self):
        super().__init__()
        for n, s in SPEC.items():
            self.register_parameter(n, torch.nn.Parameter(torch.zeros(s.shape), requires_grad=False))


@pytest.fixture
def server(tmp_path):
    spill = tmp_path / "spill"
    spill.mkdir()
    cfg = load_config(preset="smoke", overrides=["federation.min_clients=1", "federation.round_timeout_s=60"])
    transport = GrpcTransport(CLIENTS)
    servicer = FederationServicer(transport, "name: x\n", {}, None, 10 * 2**20, CHUNK)
    grpc_server = grpc.server(futures.ThreadPoolExecutor(max_workers=8), options=server_options(CHUNK))
    add_servicer(servicer, grpc_server)
    port = grpc_server.add_insecure_port("127.0.0.1:0")
    grpc_server.start()
    engine = Engine(cfg, transport, _Model(), list(SPEC), build_strategy("fedavg"), None, RunDir(tmp_path / "run"))
    assert engine.core.streaming
    transport.spill_min_bytes, transport.spill_dir = 0, str(spill)  # every update goes through a spill file
    transport.blob_check = engine.core.blob_check  # as `run_server` sets it: plain updates checked on arrival
    sessions = {c: FederationSession(ClientOptions(f"127.0.0.1:{port}", c, insecure=True), CHUNK) for c in CLIENTS}
    for c, s in sessions.items():
        s.register(TOKENS[c])
    yield engine, transport, sessions, spill
    for s in sessions.values():
        s.close()
    grpc_server.stop(0).wait()
    servicer.close()


def _round(engine, transport, r: int) -> tuple[Window, threading.Thread]:
    """Open round `r` for every client and collect it in a thread, as `run_round` does."""
    tasks = {c: TrainTask(r, engine.version, b"", 1000) for c in CLIENTS}
    for c, task in tasks.items():
        transport.send(c, task)
    w = Window(r, list(CLIENTS))
    thread = threading.Thread(target=engine.loop.collect, args=(w, tasks))
    thread.start()
    return w, thread


def _push(session, r: int, version: int, delta, chain=None, corrupt_last_byte: bool = False):
    while (pulled := session.pull()).status != "task" or pulled.task.round != r:
        pass
    payload = encode_payload(delta, Chain.from_specs(chain) if chain else None, kind="update", round=r,
                             client=session.opts.name, base_version=version)
    if corrupt_last_byte:  # in the last chunk: only the CRC-32 at the very end can tell
        payload = payload[:-1] + bytes([payload[-1] ^ 0x40])
    header = pb.UpdateHeader(round=r, base_version=version, num_tokens=TOKENS[session.opts.name], train_loss=1.0,
                             payload_bytes=len(payload))
    return session.push_raw(header, payload), payload


def _open_spill_files(spill) -> list[str]:
    """This process's open files in the spill folder (unlinked files still show here)."""
    import os

    fds = os.listdir("/proc/self/fd")
    targets = []
    for fd in fds:
        try:
            targets.append(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:
            pass
    return [t for t in targets if t.startswith(str(spill))]


def _deltas(seed: int) -> dict[str, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return {c: {n: torch.randn(s.shape, generator=g) for n, s in SPEC.items()} for c in CLIENTS}


def test_spilled_updates_fold_and_late_corruption_is_refused(server):
    engine, transport, sessions, spill = server

    # round 0: azure's last byte is flipped -> the servicer refuses it on its CRC-32
    deltas = _deltas(0)
    w, thread = _round(engine, transport, 0)
    reply, aws_payload = _push(sessions["aws"], 0, 0, deltas["aws"])
    assert reply.accepted
    reply, gcp_payload = _push(sessions["gcp"], 0, 0, deltas["gcp"], [{"name": "int8", "block": 128}])
    assert reply.accepted
    with pytest.raises(grpc.RpcError) as err:
        _push(sessions["azure"], 0, 0, deltas["azure"], corrupt_last_byte=True)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "CRC-32" in err.value.details()
    thread.join(60)
    assert w.aggregated and w.accepted == ["aws", "gcp"] and "CRC-32" in w.rejected["azure"]
    assert w.bytes_up == {"aws": len(aws_payload), "gcp": len(gcp_payload)}
    decoded = [decode_payload(p, SPEC)[0] for p in (aws_payload, gcp_payload)]
    mean = weighted_mean(decoded, [TOKENS["aws"], TOKENS["gcp"]])
    for n in SPEC:  # FedAvg from zeros: -mean of the two accepted updates (gcp's as int8 decodes it)
        torch.testing.assert_close(engine.params[n], -mean[n], rtol=1e-6, atol=1e-6)
    assert engine.version == 1 and list(spill.iterdir()) == [] and _open_spill_files(spill) == []

    # round 1: azure sends NaN as its very last value -> the engine rejects it; nothing of it is folded
    deltas = _deltas(1)
    deltas["azure"]["w"][-1] = float("nan")
    before = {n: t.clone() for n, t in engine.params.items()}
    w, thread = _round(engine, transport, 1)
    replies = {c: _push(sessions[c], 1, 1, deltas[c])[0] for c in ["azure", "aws", "gcp"]}
    thread.join(60)
    assert not replies["azure"].accepted and "NaN" in replies["azure"].message
    assert replies["aws"].accepted and replies["gcp"].accepted
    assert w.accepted == ["aws", "gcp"] and "NaN" in w.rejected["azure"]
    mean = weighted_mean([deltas["aws"], deltas["gcp"]], [TOKENS["aws"], TOKENS["gcp"]])
    for n in SPEC:
        torch.testing.assert_close(engine.params[n], before[n] - mean[n], rtol=1e-6, atol=1e-6)
    assert engine.version == 2 and list(spill.iterdir()) == [] and _open_spill_files(spill) == []
