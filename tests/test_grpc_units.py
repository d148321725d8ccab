"""The gRPC runtime's pieces, in process: chunking, tokens, the transport's round rules,
dev certificates, and a loopback server moving a payload larger than gRPC's 4 MiB
default message in small chunks."""

from __future__ import annotations

from concurrent import futures

import grpc
import pytest
import torch
from cryptography import x509

from skyfed.compression.payload import encode_payload
from skyfed.errors import AuthError, ConfigError, SkyfedError, WireFormatError
from skyfed.federation.messages import ClientResult, TrainTask
from skyfed.runtime.grpc import PROTOCOL_VERSION, skyfed_pb2 as pb
from skyfed.runtime.grpc import skyfed_pb2_grpc as pb_grpc
from skyfed.runtime.grpc.auth import call_metadata, check_token, load_tokens, read_client_token
from skyfed.runtime.grpc.certs import make_dev_certs
from skyfed.runtime.grpc.chunks import Assembler, iter_chunks
from skyfed.runtime.grpc.client import ClientOptions, FederationSession
from skyfed.runtime.grpc.rawchunks import add_servicer, data_of, encode_data_chunk
from skyfed.runtime.grpc.security import server_options
from skyfed.runtime.grpc.servicer import FederationServicer
from skyfed.runtime.grpc.transport import AlreadyReceivedError, GrpcTransport, RoundClosedError, Verdict


def test_chunks_reassemble_exactly_and_check_framing():
    data = bytes(range(256)) * 41  # 10496 bytes
    chunks = list(iter_chunks(data, 1000))
    assert [len(c) for c in chunks] == [1000] * 10 + [496]
    asm = Assembler(len(data))
    for c in chunks:
        asm.add(c)
    assert bytes(asm.finish()) == data
    short = Assembler(len(data))
    short.add(chunks[0])
    with pytest.raises(WireFormatError, match="ended after 1000 of the announced 10496"):
        short.finish()
    over = Assembler(10)
    with pytest.raises(WireFormatError, match="more than the announced 10"):
        over.add(b"x" * 11)


def test_tokens_file_and_constant_time_check(tmp_path):
    f = tmp_path / "tokens.yaml"
    f.write_text("aws: s3cret-aws-token\ngcp: s3cret-gcp-token\n")
    tokens = load_tokens(f)
    assert tokens == {"aws": "s3cret-aws-token", "gcp": "s3cret-gcp-token"}
    check_token(tokens, "aws", "s3cret-aws-token")
    with pytest.raises(AuthError, match="wrong token"):
        check_token(tokens, "aws", "s3cret-gcp-token")
    with pytest.raises(AuthError, match="unknown client"):
        check_token(tokens, "mallory", "s3cret-aws-token")
    assert read_client_token(f, "gcp") == "s3cret-gcp-token"
    single = tmp_path / "aws.token"
    single.write_text("just-the-token-value\n")
    assert read_client_token(single, "aws") == "just-the-token-value"
    bad = tmp_path / "bad.yaml"
    bad.write_text("aws: short\n")
    with pytest.raises(ConfigError, match="shorter than 8"):
        load_tokens(bad)
    with pytest.raises(ConfigError, match="not found"):
        load_tokens(tmp_path / "nope.yaml")


def _task(r: int) -> TrainTask:
    return TrainTask(r, r, b"model", 3)


def _result(client: str, r: int) -> ClientResult:
    return ClientResult(client, r, r, b"update", num_tokens=10)


def test_transport_round_rules():
    t = GrpcTransport(["aws", "gcp"])
    assert t.receive(0.0) is None
    t.send("aws", _task(0))
    assert t.next_task("aws", 0.0).round == 0
    assert t.next_task("gcp", 0.0) is None  # nothing for gcp: the long poll returns empty
    t.submit(_result("aws", 0))
    with pytest.raises(AlreadyReceivedError, match="one push per round"):
        t.submit(_result("aws", 0))  # a second push for the same round is refused
    with pytest.raises(AlreadyReceivedError):
        t.check_open("aws", 0)
    assert t.receive(0.0).client == "aws" and t.receive(0.0) is None
    t.send("gcp", _task(0))
    t.send("gcp", _task(1))  # gcp never finished round 0: replaced
    with pytest.raises(RoundClosedError, match="round 0 is not open"):
        t.submit(_result("gcp", 0))  # a past round is refused
    with pytest.raises(RoundClosedError):
        t.check_open("gcp", 2)
    assert t.next_task("gcp", 0.0).round == 1
    t.close()
    assert t.next_task("gcp", 5.0) is False
    assert t.wait_told_done(0.0) == []


def test_a_push_is_answered_once_the_engine_releases_its_update():
    """Backpressure: the servicer waits in `wait_released` until the engine has folded
    the update, so a client's next upload never overlaps the server folding its last."""
    import threading
    import time

    t = GrpcTransport(["aws", "gcp"])
    t.send("aws", _task(0))
    t.submit(_result("aws", 0))
    assert t.wait_released("aws", 0, 0.05) == Verdict(False)  # queued, not yet taken by the engine
    taken = t.receive(0.0)
    threading.Timer(0.2, t.release, [taken]).start()
    start = time.monotonic()
    assert t.wait_released("aws", 0, 10.0) == Verdict(True, None)
    assert 0.1 < time.monotonic() - start < 5.0
    t.send("gcp", _task(0))
    t.submit(ClientResult("gcp", 0, 0, None, error="boom"))  # no payload: nothing to wait for
    assert t.wait_released("gcp", 0, 0.0) == Verdict(True, None)
    assert t.receive(0.0).error == "boom"
    t.send("aws", _task(1))
    t.submit(_result("aws", 1))
    t.release(t.receive(0.0), "tensor 'w' contains NaN or Inf values")  # the engine rejects it
    assert t.wait_released("aws", 1, 0.0) == Verdict(True, "tensor 'w' contains NaN or Inf values")
    t.send("aws", _task(2))
    t.submit(_result("aws", 2))
    t.close()  # a closing server answers every waiting push
    assert t.wait_released("aws", 2, 10.0) == Verdict(False)


def test_dev_certs_have_sans_and_chain(tmp_path):
    paths = make_dev_certs(tmp_path, ["aws", "gcp"], ["localhost", "127.0.0.1", "fl.example.org"])
    ca = x509.load_pem_x509_certificate(paths["ca.pem"].read_bytes())
    server = x509.load_pem_x509_certificate(paths["server.pem"].read_bytes())
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["localhost", "fl.example.org"]
    assert [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    server.verify_directly_issued_by(ca)
    x509.load_pem_x509_certificate(paths["client-gcp.pem"].read_bytes()).verify_directly_issued_by(ca)
    assert set(load_tokens(paths["tokens.yaml"])) == {"aws", "gcp"}
    assert paths["server.key"].stat().st_mode & 0o077 == 0


@pytest.fixture
def loopback():
    """An in-process plaintext server with 64 KiB chunks and 1 MiB message limits."""
    transport = GrpcTransport(["aws"])
    chunk = 64 * 2**10
    servicer = FederationServicer(transport, "name: x\n", {"tokenizer.json": b"{}"}, {"aws": "aws-secret-token"}, 50 * 2**20, chunk)
    options = [o for o in server_options(chunk) if "message_length" not in o[0]]
    options += [("grpc.max_send_message_length", 2**20), ("grpc.max_receive_message_length", 2**20)]
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), options=options)
    add_servicer(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield transport, port
    server.stop(0).wait()


def _engine_releasing_one(transport: GrpcTransport):
    """The engine's part in a thread: take the next pushed update and release it (the
    servicer answers a push only then); the future holds what was taken."""
    from concurrent.futures import ThreadPoolExecutor

    def take():
        got = transport.receive(60.0)
        transport.release(got)
        return got

    pool = ThreadPoolExecutor(1)
    future = pool.submit(take)
    pool.shutdown(wait=False)
    return future


def test_streams_payloads_far_beyond_the_message_limit(loopback):
    transport, port = loopback
    big = torch.arange(3 * 2**20, dtype=torch.float32)  # 12 MiB, 12x the 1 MiB message limit
    model = encode_payload({"w": big}, kind="model")
    transport.send("aws", TrainTask(0, 0, model, 5, {"prox_mu": 0.1}))
    session = FederationSession(ClientOptions(f"127.0.0.1:{port}", "aws", "aws-secret-token", insecure=True))
    reply = session.register(123)
    assert reply.chunk_bytes == 64 * 2**10 and dict(reply.tokenizer_files) == {"tokenizer.json": b"{}"}
    pulled = session.pull()
    assert pulled.status == "task" and bytes(pulled.task.payload) == model
    assert pulled.task.options == {"prox_mu": 0.1} and pulled.task.steps == 5
    update = encode_payload({"w": -big}, kind="update", round=0, client="aws", base_version=0)
    engine = _engine_releasing_one(transport)  # the push is answered once the engine has taken it
    assert session.push(ClientResult("aws", 0, 0, update, num_tokens=77, train_loss=2.5))
    got = engine.result()
    assert bytes(got.payload) == update and got.num_tokens == 77 and got.train_loss == 2.5
    assert transport.clients["aws"].num_tokens == 123
    session.close()


def test_raw_data_chunks_are_protobuf_encoding():
    for size in [0, 1, 127, 128, 300, 70_000]:
        data = bytes(range(256)) * (size // 256) + bytes(size % 256)
        raw = encode_data_chunk(memoryview(data))
        assert raw == pb.UpdateChunk(data=data).SerializeToString() == pb.TaskChunk(data=data).SerializeToString()
        assert bytes(data_of(raw)) == data
    assert data_of(pb.UpdateChunk(header=pb.UpdateHeader(round=3)).SerializeToString()) is None
    assert data_of(encode_data_chunk(b"abc") + b"x") is None  # trailing bytes: not a plain data chunk


def test_a_plain_protobuf_client_interoperates(loopback):
    """A peer using the generated stub (protobuf objects) is served the same way."""
    transport, port = loopback
    session = FederationSession(ClientOptions(f"127.0.0.1:{port}", "aws", "aws-secret-token", insecure=True))
    session.register(5)
    transport.send("aws", TrainTask(0, 0, b"m" * 200_000, 1))
    stub = pb_grpc.FederationStub(session.channel)
    meta = call_metadata(PROTOCOL_VERSION, "aws", session=session.session_id)
    chunks = list(stub.PullTask(pb.PullRequest(protocol_version=PROTOCOL_VERSION, name="aws", session_id=session.session_id), metadata=meta))
    assert chunks[0].header.payload_bytes == 200_000 and b"".join(c.data for c in chunks[1:]) == b"m" * 200_000
    update = encode_payload({"w": torch.ones(70_000)}, kind="update", round=0, client="aws", base_version=0)
    head = pb.UpdateHeader(protocol_version=PROTOCOL_VERSION, name="aws", session_id=session.session_id, round=0,
                           num_tokens=9, payload_bytes=len(update))
    msgs = [pb.UpdateChunk(header=head)] + [pb.UpdateChunk(data=update[i : i + 50_000]) for i in range(0, len(update), 50_000)]
    engine = _engine_releasing_one(transport)
    assert stub.PushUpdate(iter(msgs), metadata=meta).accepted
    assert bytes(engine.result().payload) == update
    session.close()


def test_wrong_token_is_an_auth_error(loopback):
    _, port = loopback
    session = FederationSession(ClientOptions(f"127.0.0.1:{port}", "aws", "wrong-token-value", insecure=True))
    with pytest.raises(AuthError, match="UNAUTHENTICATED"):
        session.register(0)
    stranger = FederationSession(ClientOptions(f"127.0.0.1:{port}", "oracle", "aws-secret-token", insecure=True))
    with pytest.raises(AuthError, match="unknown client or wrong token"):
        stranger.register(0)


def test_unreachable_server_gives_up_with_a_hint():
    port = __import__("socket").socket()
    port.bind(("127.0.0.1", 0))
    addr = f"127.0.0.1:{port.getsockname()[1]}"
    port.close()
    session = FederationSession(ClientOptions(addr, "aws", "t", insecure=True, connect_timeout_s=0.5, initial_backoff_s=0.05))
    with pytest.raises(SkyfedError, match="cannot reach the skyfed server"):
        session.register(0)


def test_pipeline_consumes_in_order_and_hands_back_the_first_error():
    from skyfed.runtime.grpc.chunks import Pipeline

    seen = []
    pipe = Pipeline(seen.append, depth=2)
    for i in range(50):
        pipe.put(memoryview(bytes([i])))
    pipe.finish()
    assert [bytes(v)[0] for v in seen] == list(range(50))

    def consume(view):
        if bytes(view) == b"\x03":
            raise WireFormatError("bad chunk 3")
        seen.append(view)

    seen.clear()
    pipe = Pipeline(consume, depth=2)
    with pytest.raises(WireFormatError, match="bad chunk 3"):
        for i in range(1000):  # a put after the error raises it (the helper drains the rest)
            pipe.put(memoryview(bytes([i % 256])))
        pipe.finish()
    pipe.abort()
    assert [bytes(v)[0] for v in seen] == [0, 1, 2]


def test_the_server_pins_each_uploads_flow_control_window():
    from skyfed.runtime.grpc.security import FLOW_WINDOW_BYTES

    opts = dict(server_options(2**20))
    assert opts["grpc.http2.bdp_probe"] == 0 and opts["grpc.http2.lookahead_bytes"] == FLOW_WINDOW_BYTES == 4 * 2**20
    assert opts["grpc.max_receive_message_length"] == 3 * 2**20
    assert "grpc.http2.bdp_probe" not in dict(server_options(2**20, 0))  # 0: gRPC's automatic window
