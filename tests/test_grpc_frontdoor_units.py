"""Each check of the server's front door, in process: identity from call metadata,
certificate names, tokens, the open server's takeover rule, call limits, the watchdog,
strict pushes, the update size bound, per-client configs and the catch-all."""

from __future__ import annotations

import threading
import time
from concurrent import futures

import grpc
import pytest
import torch
import yaml

from skyfed.compression.bounds import max_payload_bytes
from skyfed.compression.chain import Chain
from skyfed.compression.channel import Uplink
from skyfed.compression.payload import encode_payload
from skyfed.compression.wire import spec_of
from skyfed.config import ExperimentConfig, load_config
from skyfed.errors import AuthError, ConfigError
from skyfed.federation.messages import ClientResult, TrainTask
from skyfed.runtime.grpc import PROTOCOL_VERSION, skyfed_pb2 as pb
from skyfed.runtime.grpc.auth import (
    call_metadata, certificate_names, check_certificate, check_token_choice, require_tokens,
)
from skyfed.runtime.grpc.certs import make_dev_certs
from skyfed.runtime.grpc.client import ClientOptions, FederationSession
from skyfed.runtime.grpc.client_config import PRIVATE_CORPUS, client_config
from skyfed.runtime.grpc.limits import CallBounds, CallLimits, LimitExceeded, Watchdog
from skyfed.runtime.grpc.rawchunks import add_servicer, push_call
from skyfed.runtime.grpc.security import server_options
from skyfed.runtime.grpc.servicer import FederationServicer, Refusal, _Call, peer_address
from skyfed.runtime.grpc.transport import GrpcTransport

Code = grpc.StatusCode
TOKENS = {"aws": "aws-secret-token", "gcp": "gcp-secret-token"}


class FakeContext:
    """What the servicer reads of a call: peer, metadata, TLS auth context; cancel and abort."""

    def __init__(self, peer: str = "ipv4:10.0.0.1:5555", metadata=(), auth=None):
        self._peer, self._meta, self._auth = peer, list(metadata), auth or {}
        self.cancelled = False

    def peer(self):
        return self._peer

    def invocation_metadata(self):
        return self._meta

    def auth_context(self):
        return self._auth

    def cancel(self):
        self.cancelled = True

    def abort(self, code, message):
        raise Refusal(code, message)


def _servicer(tokens=TOKENS, **kw) -> FederationServicer:
    return FederationServicer(GrpcTransport(["aws", "gcp"]), "name: x\n", {}, tokens, 10**6, 4096, **kw)


def _refused(code: grpc.StatusCode, fn) -> str:
    with pytest.raises(Refusal) as info:
        fn()
    assert info.value.code == code, info.value.message
    return info.value.message


def _admit(s: FederationServicer, method: str, ctx: FakeContext):
    call = _Call(method, peer_address(ctx.peer()))
    s._admit(call, ctx)
    s._leave(call)
    return call


def test_identity_comes_from_metadata_before_anything_is_read():
    s = _servicer()
    ok = call_metadata(PROTOCOL_VERSION, "aws", token="aws-secret-token")
    assert _admit(s, "Register", FakeContext(metadata=ok)).name == "aws"
    with pytest.raises(Refusal) as info:
        s.Register(iter(()), FakeContext(metadata=[]))  # nothing at all: refused at once
    assert info.value.code == Code.FAILED_PRECONDITION and "missing" in info.value.message
    old = call_metadata(1, "aws", token="aws-secret-token")
    assert "speaks skyfed protocol version 2" in _refused(Code.FAILED_PRECONDITION, lambda: s.Register(iter(()), FakeContext(metadata=old)))
    stranger = call_metadata(PROTOCOL_VERSION, "oracle", token="aws-secret-token")
    # with tokens, an unknown name gets the same answer as a wrong token (names are not enumerable)
    assert "unknown client or wrong token" in _refused(Code.UNAUTHENTICATED, lambda: s.Register(iter(()), FakeContext(metadata=stranger)))
    open_server = _servicer(tokens=None)
    assert "not one of" in _refused(Code.UNAUTHENTICATED, lambda: open_server.Register(iter(()), FakeContext(metadata=stranger)))
    for token in ["", "gcp-secret-token"]:
        bad = call_metadata(PROTOCOL_VERSION, "aws", token=token)
        assert "wrong token" in _refused(Code.UNAUTHENTICATED, lambda: s.Register(iter(()), FakeContext(metadata=bad)))
    no_session = call_metadata(PROTOCOL_VERSION, "aws", session="guess")
    for method in (s.PushUpdate, lambda it, ctx: list(s.PullTask(it, ctx))):
        assert "unknown session" in _refused(Code.UNAUTHENTICATED, lambda: method(iter(()), FakeContext(metadata=no_session)))
    # a request stream that would block forever is never touched by a refused call
    def never():
        raise AssertionError("the servicer read a message before authenticating")
        yield b""
    _refused(Code.UNAUTHENTICATED, lambda: s.PushUpdate(never(), FakeContext(metadata=no_session)))
    assert s.limits.by_peer == {} and s.limits.by_client == {}  # every refusal released its slots


def test_certificate_must_name_the_client(tmp_path):
    paths = make_dev_certs(tmp_path, ["aws", "gcp"], ["localhost"])
    aws_cert = {"x509_pem_cert": [paths["client-aws.pem"].read_bytes()]}
    assert certificate_names(aws_cert) == ["aws"]
    assert certificate_names({}) is None
    check_certificate(aws_cert, "aws", required=True)
    with pytest.raises(AuthError, match="issued to aws, not 'gcp'"):
        check_certificate(aws_cert, "gcp", required=True)
    with pytest.raises(AuthError, match="no client certificate"):
        check_certificate({}, "aws", required=True)
    check_certificate({}, "aws", required=False)  # no mutual TLS: nothing to check
    s = _servicer(mutual_tls=True)
    as_gcp = call_metadata(PROTOCOL_VERSION, "gcp", token="gcp-secret-token")  # gcp's own token, aws's certificate
    msg = _refused(Code.UNAUTHENTICATED, lambda: s.Register(iter(()), FakeContext(metadata=as_gcp, auth=aws_cert)))
    assert "issued to aws" in msg
    s.transport.register("gcp", "gcp-session", 5)
    later = call_metadata(PROTOCOL_VERSION, "gcp", session="gcp-session")
    _refused(Code.UNAUTHENTICATED, lambda: s.PushUpdate(iter(()), FakeContext(metadata=later, auth=aws_cert)))
    gcp_cert = {"x509_pem_cert": [paths["client-gcp.pem"].read_bytes()]}
    assert _admit(s, "PushUpdate", FakeContext(metadata=later, auth=gcp_cert)).name == "gcp"


def test_tokens_are_required_unless_open(tmp_path):
    with pytest.raises(ConfigError, match="--tokens FILE.*or --open"):
        check_token_choice(None, False)
    with pytest.raises(ConfigError, match="contradict"):
        check_token_choice(tmp_path / "t.yaml", True)
    assert require_tokens(None, True) is None


def test_open_server_keeps_a_live_name_with_its_address():
    s = _servicer(tokens=None, bounds=CallBounds(session_ttl_s=600))
    meta = call_metadata(PROTOCOL_VERSION, "aws", token="")
    first = FakeContext("ipv4:10.0.0.1:1000", meta)
    reply = s.Register(iter([pb.RegisterRequest(name="aws", num_tokens=5).SerializeToString()]), first)
    assert reply.session_id
    msg = _refused(Code.ALREADY_EXISTS, lambda: s.Register(iter(()), FakeContext("ipv6:%5B::1%5D:2000", meta)))
    assert "live session from another address" in msg
    # the same address (a restarted client) may register again
    again = s.Register(iter([pb.RegisterRequest(name="aws", num_tokens=5).SerializeToString()]), FakeContext("ipv4:10.0.0.1:1001", meta))
    assert again.session_id != reply.session_id
    quick = _servicer(tokens=None, bounds=CallBounds(session_ttl_s=0))
    quick.Register(iter([pb.RegisterRequest(name="aws").SerializeToString()]), FakeContext("ipv4:10.0.0.1:1", meta))
    quick.Register(iter([pb.RegisterRequest(name="aws").SerializeToString()]), FakeContext("ipv4:10.0.0.2:1", meta))  # silent: taken over


def test_peer_addresses_ignore_the_port():
    assert peer_address("ipv4:127.0.0.1:5555") == "127.0.0.1"
    assert peer_address("ipv6:[::1]:5555") == "::1"
    assert peer_address("ipv6:%5B::1%5D:5555") == "::1"
    assert peer_address("unix:/tmp/s") == "unix:/tmp/s"


def test_call_limits_per_client_and_per_peer():
    limits = CallLimits(per_client=2, per_peer=3)
    limits.enter_peer("1.1.1.1")
    limits.enter_client("aws")
    limits.enter_client("aws")
    with pytest.raises(LimitExceeded, match="client 'aws'"):
        limits.enter_client("aws")
    limits.enter_client("gcp")
    limits.enter_peer("1.1.1.1")
    limits.enter_peer("1.1.1.1")
    with pytest.raises(LimitExceeded, match="from 1.1.1.1"):
        limits.enter_peer("1.1.1.1")
    limits.enter_peer("2.2.2.2")  # another address is not affected
    limits.leave_client("aws")
    limits.enter_client("aws")
    assert limits.active("aws") == 2 and limits.active("azure") == 0
    s = _servicer(bounds=CallBounds(max_calls_per_client=1))
    s.transport.register("aws", "sess", 5)
    meta = call_metadata(PROTOCOL_VERSION, "aws", session="sess")
    held = _Call("PushUpdate", "10.0.0.1")
    s._admit(held, FakeContext(metadata=meta))
    assert "concurrent calls for client 'aws'" in _refused(Code.RESOURCE_EXHAUSTED, lambda: s.PushUpdate(iter(()), FakeContext(metadata=meta)))
    s._leave(held)
    assert s.limits.by_client == {}


def test_watchdog_cancels_idle_and_overlong_calls():
    dog = Watchdog(stream_timeout_s=100.0, idle_timeout_s=5.0, tick_s=3600)
    cancelled = []
    idle = dog.watch(lambda: cancelled.append("idle"), "idle call")
    busy = dog.watch(lambda: cancelled.append("busy"), "busy call")
    now = time.monotonic()
    idle.waiting()  # waits on its peer from now on
    assert dog.check(now + 1) == 0
    assert dog.check(now + 6) == 1 and cancelled == ["idle"] and "sent or took nothing" in idle.reason
    assert dog.check(now + 50) == 0  # busy: server-side work is not idle time
    assert dog.check(now + 101) == 1 and cancelled == ["idle", "busy"] and busy.reason == "ran past the stream deadline"
    dog.close()


def test_a_stalled_stream_is_cancelled_by_the_watchdog():
    """A real call whose client never sends its header is cancelled after the idle timeout."""
    transport = GrpcTransport(["aws"])
    servicer = FederationServicer(transport, "x: 1\n", {}, {"aws": "aws-secret-token"}, 10**6, 4096,
                                  bounds=CallBounds(idle_timeout_s=0.5))
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), options=server_options(4096))
    add_servicer(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    session = FederationSession(ClientOptions(f"127.0.0.1:{port}", "aws", "aws-secret-token", insecure=True))
    try:
        session.register(5)
        release = threading.Event()

        def silent():
            release.wait(30)
            return
            yield b""

        future = push_call(session.channel).future(silent(), metadata=session._metadata())
        with pytest.raises(grpc.RpcError) as info:
            future.result(timeout=30)
        assert info.value.code() == Code.CANCELLED
        release.set()
        end = time.monotonic() + 30  # the server thread lets go of the call's slots as it unwinds
        while (servicer.limits.by_client or servicer.limits.by_peer) and time.monotonic() < end:
            time.sleep(0.01)
        assert servicer.limits.by_client == {} and servicer.limits.by_peer == {}
    finally:
        session.close()
        server.stop(0).wait()
        servicer.close()


def _push_servicer():
    s = _servicer()
    s.transport.register("aws", "sess", 5)
    s.transport.send("aws", TrainTask(3, 7, b"m", 1))
    return s, call_metadata(PROTOCOL_VERSION, "aws", session="sess")


def _stream(header: pb.UpdateHeader, payload: bytes = b"", chunk: int = 1000):
    yield pb.UpdateChunk(header=header).SerializeToString()
    for i in range(0, len(payload), chunk):
        yield pb.UpdateChunk(data=payload[i : i + chunk]).SerializeToString()


def _header(payload: bytes, round=3, base=7, **kw) -> pb.UpdateHeader:
    return pb.UpdateHeader(name="aws", round=round, base_version=base, num_tokens=10, payload_bytes=len(payload), **kw)



def test_pushes_are_strict_about_rounds_versions_replays_and_repeats():
    delta = {"w": torch.ones(50)}
    good = encode_payload(delta, kind="update", round=3, client="aws", base_version=7)
    s, meta = _push_servicer()
    for header, payload, code, text in [
        (_header(good, round=4), good, Code.FAILED_PRECONDITION, "not open"),
        (_header(good, base=6), good, Code.FAILED_PRECONDITION, "model version 6"),
        (pb.UpdateHeader(name="aws", round=3, base_version=7, num_tokens=-5, payload_bytes=len(good)), good, Code.INVALID_ARGUMENT, "negative token count"),
        (pb.UpdateHeader(name="gcp", round=3, base_version=7, payload_bytes=len(good)), good, Code.INVALID_ARGUMENT, "names client 'gcp'"),
    ]:
        assert text in _refused(code, lambda: s.PushUpdate(_stream(header, payload), FakeContext(metadata=meta)))
    assert s.transport.receive(0.0) is None  # none of these reached the engine
    # an old update re-labelled for this round: its own header still says round 2
    old = encode_payload(delta, kind="update", round=2, client="aws", base_version=7)
    msg = _refused(Code.INVALID_ARGUMENT, lambda: s.PushUpdate(_stream(_header(old), old), FakeContext(metadata=meta)))
    assert "header says round=2" in msg
    refused = s.transport.receive(0.0)
    assert refused.payload is None and "replayed" in refused.error  # the round does not wait for it
    assert "one push per round" in _refused(Code.ALREADY_EXISTS, lambda: s.PushUpdate(_stream(_header(good), good), FakeContext(metadata=meta)))
    # another client's payload, or a payload with no round, is refused the same way
    s2, meta2 = _push_servicer()
    foreign = encode_payload(delta, kind="update", round=3, client="gcp", base_version=7)
    assert "client='gcp'" in _refused(Code.INVALID_ARGUMENT, lambda: s2.PushUpdate(_stream(_header(foreign), foreign), FakeContext(metadata=meta2)))


def test_one_upload_per_client_at_a_time():
    s, meta = _push_servicer()
    s._uploading.add("aws")  # another upload of aws is in progress
    payload = encode_payload({"w": torch.ones(5)}, kind="update", round=3, client="aws", base_version=7)
    assert "one at a time" in _refused(Code.ABORTED, lambda: s.PushUpdate(_stream(_header(payload), payload), FakeContext(metadata=meta)))
    assert s.transport.receive(0.0) is None  # not recorded: the client may retry


def test_oversized_announcement_is_refused_before_allocation(monkeypatch):
    s, meta = _push_servicer()
    spec = {"w": spec_of({"w": torch.ones(50)})["w"]}
    limit = s.limit_update_size(spec, [])
    assert limit == max_payload_bytes(spec, Chain([]), ["aws", "gcp"]) < 10**6
    allocated = []
    real = s.transport.receive_buffer  # where every receive buffer (memory or spill file) is made
    monkeypatch.setattr(s.transport, "receive_buffer", lambda size, what: allocated.append(size) or real(size, what))
    header = pb.UpdateHeader(name="aws", round=3, base_version=7, payload_bytes=2 * 2**30)
    msg = _refused(Code.RESOURCE_EXHAUSTED, lambda: s.PushUpdate(_stream(header), FakeContext(metadata=meta)))
    assert f"can produce is {limit} bytes" in msg and allocated == []


def test_any_exception_is_one_refusal_and_the_server_carries_on(monkeypatch):
    s, meta = _push_servicer()
    monkeypatch.setattr(s.transport, "check_open", lambda *a: (_ for _ in ()).throw(RecursionError("deep")))
    payload = encode_payload({"w": torch.ones(5)}, kind="update", round=3, client="aws", base_version=7)
    msg = _refused(Code.INTERNAL, lambda: s.PushUpdate(_stream(_header(payload), payload), FakeContext(metadata=meta)))
    assert "RecursionError" in msg and s.limits.by_client == {}
    deep = "[" * 100_000 + "]" * 100_000
    s2, meta2 = _push_servicer()
    h = _header(payload, meta_json=deep)
    assert "meta_json" in _refused(Code.INVALID_ARGUMENT, lambda: s2.PushUpdate(_stream(h, payload), FakeContext(metadata=meta2)))
    garbage = iter([b"\xff\xfe not protobuf"])
    _refused(Code.INVALID_ARGUMENT, lambda: s2.PushUpdate(garbage, FakeContext(metadata=meta2)))


def test_an_engine_rejection_reaches_the_client():
    """The engine releases an update with a reason: the push is answered accepted=False with it."""
    s, meta = _push_servicer()
    payload = encode_payload({"w": torch.ones(5)}, kind="update", round=3, client="aws", base_version=7)

    def engine():
        result = None
        while result is None:
            result = s.transport.receive(5.0)
        s.transport.release(result, "tensor 'w' contains NaN or Inf values")

    t = threading.Thread(target=engine)
    t.start()
    reply = s.PushUpdate(_stream(_header(payload), payload), FakeContext(metadata=meta))
    t.join(10)
    assert reply.accepted is False and "NaN or Inf" in reply.message
    ok = FederationSession.__new__(FederationSession)  # the client's side: it logs and returns False
    ok.opts = ClientOptions("x", "aws")
    ok._retrying = lambda what, call: reply
    ok.push_raw = lambda h, p: reply
    assert ok.push(ClientResult("aws", 3, 7, payload)) is False


def test_update_size_bound_covers_every_chain_and_is_tight():
    torch.manual_seed(0)
    t = {"wte": torch.randn(300, 32), "attn": torch.randn(32, 96), "bias": torch.randn(32), "odd": torch.randn(3, 5, 7)}
    for specs in [[], ["fp16"], ["int8"], [{"name": "int4", "block": 32}], ["sign"], [{"name": "topk", "fraction": 0.01}, "int8"],
                  [{"name": "topk", "fraction": 0.05, "scope": "global"}], [{"name": "lowrank", "rank": 4}, "int8"],
                  [{"name": "lowrank", "rank_by_round": [2, 8]}], [{"name": "randk", "fraction": 0.1}, "fp16"]]:
        chain = Chain.from_specs(specs)
        bound = max_payload_bytes(spec_of(t), chain, ["aws", "a-much-longer-client-name"])
        sizes = [len(Uplink(chain).encode(t, 99 + r, kind="update", round=r, client="a-much-longer-client-name", base_version=r))
                 for r in range(3)]
        assert max(sizes) <= bound, specs
        slack = 20_000 if "global" in str(specs) else 6_000  # a global top-k may put k values in any tensor
        assert bound - max(sizes) < slack, (specs, bound, sizes)


def test_client_config_leaves_out_paths_and_other_clients_data(tmp_path):
    corpus = tmp_path / "server-corpus.txt"
    cfg = load_config(None, "smoke", [
        f"data.path={corpus}", f"data.valid_path={tmp_path / 'valid.txt'}", f"out_dir={tmp_path / 'runs'}",
        f"tokenizer.path={tmp_path / 'tok'}",
        "federation.clients=[{name: aws, data: /secret/aws-data}, {name: gcp, data: /secret/gcp-data}, {name: azure}]",
    ])
    text = client_config(cfg, "aws")
    assert str(tmp_path) not in text and "gcp-data" not in text
    sent = ExperimentConfig.model_validate(yaml.safe_load(text))  # the client can read it
    assert sent.data.path == PRIVATE_CORPUS and sent.data.valid_path is None and sent.tokenizer.path is None
    assert [(c.name, c.data) for c in sent.federation.clients] == [("aws", "/secret/aws-data"), ("gcp", None), ("azure", None)]
    assert sent.out_dir == "runs" and sent.clouds == ExperimentConfig().clouds
    assert sent.model == cfg.model and sent.train == cfg.train and sent.compression == cfg.compression
    assert sent.federation.rounds == cfg.federation.rounds and sent.seed == cfg.seed
    bundled = ExperimentConfig.model_validate(yaml.safe_load(client_config(load_config(None, "smoke", []), "gcp")))
    assert bundled.data.path == "wikitext2"  # every client has the bundled corpus
    from skyfed.runtime.grpc.client import _local_tokens

    with pytest.raises(ConfigError, match="pass --data"):
        _local_tokens(sent, "azure", None, None, "")
