"""Secure aggregation's control messages at the gRPC front door, in process: the real
`FederationServicer` and `GrpcTransport`, the real coordinator in a thread. Control
answers pass the same checks as updates (round and stage open, one push per round and
stage, size bound before allocation, the payload's own header); a message the protocol
refuses is answered with INVALID_ARGUMENT and drops its client; nothing ends the
server; relayed keys are filed under the authenticated name."""

from __future__ import annotations

import json
import threading

import grpc
import pytest
import torch

from skyfed.compression.wire import pack, spec_of
from skyfed.errors import SecAggError
from skyfed.federation.messages import ClientResult, TrainTask
from skyfed.runtime.grpc import PROTOCOL_VERSION, skyfed_pb2 as pb
from skyfed.runtime.grpc.auth import call_metadata
from skyfed.runtime.grpc.servicer import FederationServicer, Refusal
from skyfed.runtime.grpc.transport import AlreadyReceivedError, GrpcTransport, RoundClosedError, Verdict
from skyfed.security.secagg import SecAggSettings
from skyfed.security.secagg.coordinator import SecAggCoordinator
from skyfed.security.secagg.messages import max_control_bytes, pack_control, unpack_control
from skyfed.security.secagg.participant import SecAggParticipant

Code = grpc.StatusCode
NAMES = ["aws", "gcp", "azure"]
TOKENS = {n: f"{n}-secret-token" for n in NAMES}
SPEC = spec_of({"w": torch.zeros(6, 5), "b": torch.zeros(4)})
SETTINGS = SecAggSettings(ring_bits=32, bound=0.5)


class FakeContext:
    def __init__(self, name: str):
        self._meta = call_metadata(PROTOCOL_VERSION, name, session=f"sess-{name}")

    def peer(self):
        return "ipv4:10.0.0.1:5555"

    def invocation_metadata(self):
        return self._meta

    def auth_context(self):
        return {}

    def cancel(self):
        pass

    def abort(self, code, message):
        raise Refusal(code, message)


def servicer() -> FederationServicer:
    s = FederationServicer(GrpcTransport(NAMES), "name: x\n", {}, TOKENS, 10**6, 4096)
    for n in NAMES:
        s.transport.register(n, f"sess-{n}", 5)
    return s


def push(s: FederationServicer, name: str, payload: bytes, stage: str | None, round: int = 0, version: int = 0,
         **meta) -> pb.PushReply:
    if stage is not None:
        meta["secagg_stage"] = stage
    header = pb.UpdateHeader(name=name, round=round, base_version=version, num_tokens=0, payload_bytes=len(payload),
                             meta_json=json.dumps(meta))

    def stream():
        yield pb.UpdateChunk(header=header).SerializeToString()
        yield pb.UpdateChunk(data=payload).SerializeToString()

    return s.PushUpdate(stream(), FakeContext(name))


def refused(code: grpc.StatusCode, fn) -> str:
    with pytest.raises(Refusal) as info:
        fn()
    assert info.value.code == code, info.value.message
    return info.value.message


def keys_answer(name: str, round: int = 0) -> bytes:
    task = TrainTask(round, 0, pack_control("keys", round, {"clients": 3}), 0, {"secagg": {"stage": "keys"}})
    return SecAggParticipant(name, SPEC, SETTINGS).control(task).payload


def test_the_transport_takes_one_answer_per_round_and_stage():
    t = GrpcTransport(["aws"])
    for stage in ["keys", "shares"]:
        t.send("aws", TrainTask(4, 1, b"", 0, {"secagg": {"stage": stage}}))
        t.check_open("aws", 4, 1, stage)
        with pytest.raises(RoundClosedError, match=rf"round 4 is not open.*open round: 4 \({stage}\)"):
            t.check_open("aws", 4, 1)  # the open task is a control stage, not training
        t.submit(ClientResult("aws", 4, 1, b"x", meta={"secagg_stage": stage}))
        with pytest.raises(AlreadyReceivedError, match="one push per round"):
            t.check_open("aws", 4, 1, stage)
        result = t.receive(1.0)
        assert result.meta["secagg_stage"] == stage
        assert t.wait_released("aws", 4, 0.0, stage).released is False
        t.release(result, "bad keys")
        assert t.wait_released("aws", 4, 0.0, stage) == Verdict(True, "bad keys")
    t.send("aws", TrainTask(4, 1, b"model", 3, {"secagg": {"stage": "mask", "bundle": {}}}))
    t.check_open("aws", 4, 1)  # the training task's result is the round's update
    t.submit(ClientResult("aws", 4, 1, b"masked"))
    with pytest.raises(AlreadyReceivedError):
        t.check_open("aws", 4, 1)
    assert t.registry_state()["aws"]["rounds_submitted"] == [4]  # control answers are not rounds


@pytest.mark.parametrize("case", ["oversized", "tensors", "other client", "other stage", "unknown stage", "closed stage", "bad framing"])
def test_a_malformed_control_answer_is_refused_at_the_door(case, monkeypatch):
    s = servicer()
    s.transport.send("aws", TrainTask(0, 0, pack_control("keys", 0, {"clients": 3}), 0, {"secagg": {"stage": "keys"}}))
    good = keys_answer("aws")
    if case == "oversized":
        import skyfed.runtime.grpc.servicer as servicer_mod
        allocated = []
        real = servicer_mod.Assembler
        monkeypatch.setattr(servicer_mod, "Assembler", lambda size, what: allocated.append(size) or real(size, what))
        header = pb.UpdateHeader(name="aws", round=0, base_version=0, payload_bytes=s.control_limit + 1,
                                 meta_json=json.dumps({"secagg_stage": "keys"}))
        msg = refused(Code.RESOURCE_EXHAUSTED, lambda: s.PushUpdate(iter([pb.UpdateChunk(header=header).SerializeToString()]), FakeContext("aws")))
        assert "control message among 3 clients" in msg and allocated == []
        assert s.control_limit == max_control_bytes(NAMES) < 10**6
    elif case == "tensors":
        bad = pack({"x": torch.zeros(4)}, {"kind": "secagg", "stage": "keys", "round": 0, "client": "aws", "secagg": {}})
        assert "must carry none" in refused(Code.INVALID_ARGUMENT, lambda: push(s, "aws", bad, "keys"))
    elif case == "other client":
        forged = keys_answer("gcp")  # gcp's answer, pushed on aws's authenticated call
        assert "header says client='gcp'" in refused(Code.INVALID_ARGUMENT, lambda: push(s, "aws", forged, "keys"))
    elif case == "other stage":
        wrong = pack_control("shares", 0, {"client": "aws"}, client="aws")
        assert "header says stage='shares'" in refused(Code.INVALID_ARGUMENT, lambda: push(s, "aws", wrong, "keys"))
    elif case in ("unknown stage", "closed stage"):  # refused before the push is taken as aws's answer
        if case == "unknown stage":
            assert "unknown stage" in refused(Code.INVALID_ARGUMENT, lambda: push(s, "aws", good, "sneaky"))
        else:
            assert "not open" in refused(Code.FAILED_PRECONDITION, lambda: push(s, "aws", good, "unmask"))
            assert "not open" in refused(Code.FAILED_PRECONDITION, lambda: push(s, "aws", good, None))  # not the training task
        assert s.transport.receive(0.0) is None  # not recorded: the keys stage still waits for aws
        return
    else:
        assert "bad magic" in refused(Code.INVALID_ARGUMENT, lambda: push(s, "aws", b"x" * 64, "keys"))
    recorded = s.transport.receive(0.0)  # the engine learns of the refusal: the stage does not wait for aws
    assert recorded.client == "aws" and recorded.payload is None and recorded.meta["secagg_stage"] == "keys"
    assert "refused by the server" in recorded.error
    assert "one push per round" in refused(Code.ALREADY_EXISTS, lambda: push(s, "aws", good, "keys"))


def test_the_protocol_refuses_bad_bodies_and_relays_keys_under_the_authenticated_name():
    s = servicer()
    coord = SecAggCoordinator(SPEC, SETTINGS, max_tokens=100, stage_timeout_s=3.0)
    out = {}

    def setup():
        try:
            out["options"] = coord.setup(s.transport, NAMES, 0, 0)
        except SecAggError as exc:
            out["error"] = str(exc)

    thread = threading.Thread(target=setup)
    thread.start()
    tasks = {n: s.transport.next_task(n, 10.0) for n in NAMES}
    assert all(t.options == {"secagg": {"stage": "keys"}} for t in tasks.values())
    participants = {n: SecAggParticipant(n, SPEC, SETTINGS) for n in NAMES}
    aws = participants["aws"].control(tasks["aws"])
    assert push(s, "aws", aws.payload, "keys").accepted
    assert "one push per round" in refused(Code.ALREADY_EXISTS, lambda: push(s, "aws", aws.payload, "keys"))  # a replay
    # azure's header is its own, but its body claims to be aws: the protocol refuses it
    forged = pack_control("keys", 0, {"client": "aws", "mask_pk": "A" * 44, "enc_pk": "B" * 44}, client="azure")
    assert "claims to be from 'aws'" in refused(Code.INVALID_ARGUMENT, lambda: push(s, "azure", forged, "keys"))
    gcp = participants["gcp"].control(tasks["gcp"])
    assert push(s, "gcp", gcp.payload, "keys").accepted
    # the roster: aws and gcp under the names their calls authenticated, with the keys they sent
    shares = {n: s.transport.next_task(n, 10.0) for n in ["aws", "gcp"]}
    assert s.transport.next_task("azure", 0.0) is None  # azure was dropped: no shares task
    roster = unpack_control(shares["aws"].payload, "shares", 0)
    sent = {n: unpack_control(r.payload, "keys", 0)["client"] for n, r in [("aws", aws), ("gcp", gcp)]}
    assert sorted(roster["clients"]) == ["aws", "gcp"] and sent == {"aws": "aws", "gcp": "gcp"}
    assert roster["clients"]["aws"]["mask_pk"] == unpack_control(aws.payload, "keys", 0)["mask_pk"]
    # a shares answer with a bad body (not base64): refused, and the session cannot go on with one sharer
    bad = pack_control("shares", 0, {"client": "gcp", "shares": {"aws": "!!"}, "seed_digest": "%%"}, client="gcp")
    assert "not valid base64" in refused(Code.INVALID_ARGUMENT, lambda: push(s, "gcp", bad, "shares"))
    good = participants["aws"].control(shares["aws"])
    assert push(s, "aws", good.payload, "shares").accepted
    thread.join(30)
    assert not thread.is_alive()
    assert "only 1 clients finished set-up, threshold 2" in out["error"]  # refused, logged by the loop; no crash
    assert coord.bytes_up["aws"] == len(aws.payload) + len(good.payload)
    s.close()
