"""Receiving an update in chunks and folding it slab by slab: the framing checked as the
chunks pass (one CRC-32 pass), the slab decoder equal to the whole-payload decode for
every codec it takes, and a bad update refused before any of it reaches the sum."""

from __future__ import annotations

import json
import struct
import zlib

import pytest
import torch

from skyfed.compression import slabs
from skyfed.compression.chain import Chain
from skyfed.compression.framing import FrameReader
from skyfed.compression.payload import decode_payload, encode_payload
from skyfed.compression.slabs import SlabDelta, sliceable
from skyfed.compression.spill import SpilledPayload, SpillWriter
from skyfed.compression.streamcheck import BlobCheck
from skyfed.compression.wire import FORMAT_VERSION, MAGIC, Framed, TensorSpec, read_header
from skyfed.errors import WireFormatError
from skyfed.federation.messages import ClientResult
from skyfed.federation.server import Rejection, ServerCore
from skyfed.federation.strategies import build_strategy

SPEC = {"a": TensorSpec((37, 29), torch.float32), "b": TensorSpec((1000,), torch.float32), "c": TensorSpec((0,), torch.float32)}
CHAINS = {"plain": None, "fp16": ["fp16"], "bf16": ["bf16"], "int8": [{"name": "int8", "block": 64}], "int4": [{"name": "int4", "block": 32}]}


@pytest.fixture(autouse=True)
def small_slabs(monkeypatch):
    monkeypatch.setattr(slabs, "SLAB_VALUES", 200)  # many slabs, and short tails, on small tensors


def _delta(seed: int = 0, scale: float = 1.0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {n: scale * torch.randn(s.shape, generator=g) for n, s in SPEC.items()}


def _payload(delta, chain=None, **header) -> bytes:
    header = {"kind": "update", "round": 0, "client": "c0", "base_version": 0, **header}
    return encode_payload(delta, Chain.from_specs(chain) if chain else None, **header)


def _receive(payload: bytes, chunk: int, spill_dir=None, blob_check=None) -> Framed | SpilledPayload:
    """What the servicer does: frame check and store, chunk by chunk."""
    frame = FrameReader(len(payload), what="update from c0", blob_check=blob_check)
    buf = SpillWriter(len(payload), spill_dir) if spill_dir is not None else None
    framed = Framed(len(payload))
    for i in range(0, len(payload), chunk):
        piece = memoryview(payload)[i : i + chunk]
        frame.feed(piece)
        if buf is not None:
            buf.add(piece)
        framed[i : i + len(piece)] = piece
    header = frame.finish()
    if buf is not None:
        return buf.finish(header, frame.blob_start, frame.verdict)
    return framed.checked(header, frame.blob_start, frame.verdict)


def _mangle(payload: bytes, at: int, value: bytes) -> bytes:
    data = bytearray(payload)
    data[at : at + len(value)] = value
    return bytes(data)


def _refix_crc(payload: bytes) -> bytes:
    """Recompute blob_bytes / crc32 so that only the checks behind the CRC can tell."""
    (head_len,) = struct.unpack_from("<I", payload, 8)
    header = json.loads(payload[12 : 12 + head_len])
    blob = payload[12 + head_len :]
    header.update(blob_bytes=len(blob), crc32=zlib.crc32(blob))
    head = json.dumps(header).encode()
    return struct.pack("<6sHI", MAGIC, FORMAT_VERSION, len(head)) + head + blob


# ---------------------------------------------------------------- framing as the chunks pass


@pytest.mark.parametrize("chunk", [1, 5, 64, 4096, 10**6])
def test_frame_reader_gives_read_headers_verdicts_chunk_by_chunk(chunk):
    good = _payload(_delta())
    header = _receive(good, chunk).header
    assert header == read_header(good)[0]
    bad = [
        (_mangle(good, len(good) - 3, bytes([good[-3] ^ 1])), "CRC-32 checksum mismatch"),  # one bit of the last bytes
        (_mangle(good, 0, b"NOTSKY"), "bad magic"),
        (_mangle(good, 6, b"\x09\x00"), "unsupported wire format version 9"),
        (_mangle(good, 8, b"\xff\xff\xff\x00"), "does not fit"),
        (good[:12] + b"[" + good[13:], "corrupt payload header"),
    ]
    for payload, message in bad:
        with pytest.raises(WireFormatError, match=message):
            read_header(payload)
        with pytest.raises(WireFormatError, match=f"update from c0: .*{message}"):
            _receive(payload, chunk)
    with pytest.raises(WireFormatError, match="ended after"):  # the stream stops early
        frame = FrameReader(len(good), what="u")
        frame.feed(good[:-10])
        frame.finish()
    with pytest.raises(WireFormatError, match="expected 8484 tensor bytes, got 8494"):  # announced != the header's
        FrameReader(len(good) + 10, what="u").feed(good)
    with pytest.raises(WireFormatError, match="more than the announced"):
        FrameReader(len(good) - 1).feed(good)
    with pytest.raises(WireFormatError, match="shorter than the 12-byte prefix"):
        frame = FrameReader(5)
        frame.feed(good[:5])
        frame.finish()


def test_a_payload_checked_on_arrival_is_not_crc_checked_again(monkeypatch):
    payload = _payload(_delta())
    hashed = []
    real = zlib.crc32
    monkeypatch.setattr(zlib, "crc32", lambda data, value=0: hashed.append(len(data)) or real(data, value))
    framed = _receive(payload, 1000)
    blob_len = len(payload) - framed.blob_start
    assert sum(hashed) == blob_len  # one pass, as the chunks went by
    framed[-1] ^= 0xFF  # changed after the check: the recorded verdict stands, no second pass
    assert read_header(framed)[0] == framed.header and sum(hashed) == blob_len
    core = ServerCore(_Model(), list(SPEC), build_strategy("fedavg"), max_update_bytes=10**8)
    got = core.accept(ClientResult("c0", 0, 0, _receive(payload, 1000), num_tokens=5), 0, 0)
    assert not isinstance(got, Rejection) and sum(hashed) == 2 * blob_len  # the core's decode hashed nothing
    assert read_header(bytearray(payload))[0] and sum(hashed) == 3 * blob_len  # plain bytes: checked in full


# ---------------------------------------------------------------- values checked as the chunks pass


def _checker(header, what):
    return BlobCheck(SPEC, header["blob_bytes"], what) if not header.get("codecs") else None


@pytest.mark.parametrize("chunk", [1, 3, 4, 777, 4096, 10**6])
def test_blob_check_on_the_chunks_gives_the_whole_checks_verdict(chunk):
    assert _receive(_payload(_delta()), chunk, blob_check=_checker).verdict == ""
    assert _receive(_payload(_delta(), ["int8"]), chunk, blob_check=_checker).verdict is None  # encoded: checked later
    for case in ["nan in the last slab", "a value above the bound", "wrong shape", "a tensor the model lacks"]:
        payload, message = _bad_payloads()[case]
        verdict = _receive(payload, chunk, blob_check=_checker).verdict
        assert verdict is not None and message in verdict and verdict.startswith("update from c0")
    for at in range(4):  # a NaN whose 4 bytes are split between two chunks at every offset
        delta = _delta(7)
        delta["a"][5, 5] = float("nan")
        payload = _payload(delta)
        where = bytes(payload).index(struct.pack("<f", float("nan")))
        frame = FrameReader(len(payload), blob_check=_checker)
        frame.feed(payload[: where + at])
        frame.feed(payload[where + at :])
        frame.finish()
        assert "tensor 'a' contains NaN" in frame.verdict


def test_blob_check_gives_up_on_overlapping_entries():
    meta = json.dumps({"a": {"dtype": "F32", "shape": [37, 29], "data_offsets": [0, 4292]},
                       "b": {"dtype": "F32", "shape": [1000], "data_offsets": [4, 4004]},
                       "c": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}}).encode()
    blob = struct.pack("<Q", len(meta)) + meta + bytes(4292)
    check = BlobCheck(SPEC, len(blob))
    check.feed(blob)
    assert check.verdict is None and check.gave_up  # left to the core's full check


def test_the_core_refuses_on_the_arrival_verdict_and_does_not_check_values_again(monkeypatch):
    core = ServerCore(_Model(), list(SPEC), build_strategy("fedavg"), max_update_bytes=10**8)
    payload, _ = _bad_payloads()["nan in the last slab"]
    got = core.accept(ClientResult("c0", 0, 0, _receive(payload, 1000, blob_check=core.blob_check), num_tokens=5), 0, 0)
    assert isinstance(got, Rejection) and "tensor 'b' contains NaN" in got.reason
    import skyfed.compression.wire as wire_mod
    calls = []
    real = wire_mod.value_error
    monkeypatch.setattr(wire_mod, "value_error", lambda t, m=None: calls.append(t.numel()) or real(t, m))
    good = _receive(_payload(_delta()), 1000, blob_check=core.blob_check)
    assert good.verdict == ""
    got = core.accept(ClientResult("c0", 0, 0, good, num_tokens=5), 0, 0)
    assert not isinstance(got, Rejection) and calls == []  # checked once, on arrival


# ---------------------------------------------------------------- slab decoding


@pytest.mark.parametrize("name", list(CHAINS))
@pytest.mark.parametrize("spilled", [False, True])
def test_slab_delta_decodes_and_folds_like_the_whole_payload(tmp_path, name, spilled):
    payload = _payload(_delta(1), CHAINS[name])
    whole, _ = decode_payload(payload, SPEC)
    got = _receive(payload, 777, tmp_path if spilled else None)
    assert sliceable(got.header)
    delta = SlabDelta(got, got.header, got.blob_start, SPEC, "update from c0")
    for n in SPEC:
        assert torch.equal(delta[n], whole[n])  # the same decode, value for value
    acc = {n: torch.full(s.shape, 0.5) for n, s in SPEC.items()}
    ref = {n: t.clone().add_(whole[n], alpha=0.3) for n, t in acc.items()}
    delta.fold_into(acc, 0.3)
    for n in SPEC:
        torch.testing.assert_close(acc[n], ref[n], rtol=0, atol=1e-6)
    assert all(b.numel() <= 4 * slabs.SLAB_VALUES + 64 for b in delta._buffers.values())  # a slab, not the update
    delta.close()
    assert list(tmp_path.iterdir()) == []  # spill files are anonymous: nothing is left behind


def test_chains_that_do_not_decode_by_slabs_are_not_sliced():
    delta = {n: t for n, t in _delta().items() if t.numel()}  # (randk cannot encode an empty tensor)
    for chain in (["topk"], ["randk"], [{"name": "topk", "fraction": 0.1}, "int8"], ["sign"]):
        payload = _payload(delta, chain)
        assert not sliceable(read_header(payload)[0]), chain


def _bad_payloads() -> dict[str, tuple[bytes, str]]:
    nan_last = _delta(2)
    nan_last["b"][-1] = float("nan")  # the last value of the last slab
    huge = _delta(2)
    huge["a"][-1, -1] = 1e31
    int8 = _payload(_delta(3), CHAINS["int8"])
    wrong_shape = {**_delta(), "a": torch.zeros(29, 37)}
    extra = {**_delta(), "z": torch.zeros(3)}
    return {
        "nan in the last slab": (_payload(nan_last), "tensor 'b' contains NaN or Inf"),
        "a value above the bound": (_payload(huge), "above the bound"),
        "nan in the last slab, int8": (_payload(nan_last, CHAINS["int8"]), "scales must be finite"),
        "wrong shape": (_payload(wrong_shape), "has shape"),
        "a tensor the model lacks": (_payload(extra), "does not match the model's parameters"),
        "int8 part of the wrong shape": (_payload({**_delta(), "a": torch.zeros(7)}, CHAINS["int8"]), "encoded part 'q'"),
        "int8 value -128 in the last slab": (_refix_crc(_mangle(int8, len(int8) - 1, b"\x80")), "outside the codec's range"),
    }


@pytest.mark.parametrize("case", list(_bad_payloads()))
def test_a_bad_update_is_refused_before_any_of_it_is_folded(tmp_path, case):
    payload, message = _bad_payloads()[case]
    with pytest.raises(WireFormatError, match=message):
        decode_payload(payload, SPEC)  # the whole-payload decode says the same
    got = _receive(payload, 1000, tmp_path)
    with pytest.raises(WireFormatError, match=message):
        SlabDelta(got, got.header, got.blob_start, SPEC, "update from c0")


# ---------------------------------------------------------------- the server core


class _Model(torch.nn.Module):
    def __init__(self):
        super().__init__()
        for n, s in SPEC.items():
            self.register_parameter(n, torch.nn.Parameter(torch.ones(s.shape)))


def _result(client: str, payload) -> ClientResult:
    return ClientResult(client, 0, 0, payload, num_tokens={"c0": 10, "c1": 30, "c2": 60}[client], train_loss=1.0)


def test_a_late_bad_update_leaves_the_running_sum_bit_identical(tmp_path):
    """c1's update is refused at its last value (NaN), between c0's and c2's: the round's
    sum, and so the next model, equal a round without c1 bit for bit."""
    nan_last = _delta(5)
    nan_last["b"][-1] = float("nan")
    arrivals = {
        "c0": _payload(_delta(4), client="c0"),
        "c1": _payload(nan_last, CHAINS["int8"], client="c1"),
        "c2": _payload(_delta(6), CHAINS["int8"], client="c2"),
    }

    def round_of(clients: list[str]):
        core = ServerCore(_Model(), list(SPEC), build_strategy("fedavg"), max_update_bytes=10**8)
        agg = core.new_aggregate()
        rejected = {}
        for c in clients:
            got = core.accept(_result(c, _receive(arrivals[c], 4096, tmp_path)), 0, 0)
            if isinstance(got, Rejection):
                rejected[c] = got.reason
            else:
                assert isinstance(got.delta, SlabDelta)
                agg.add(got)
        out = agg.result(core.params, 0)
        core.publish(out)
        return core, out, rejected

    core, out, rejected = round_of(["c0", "c1", "c2"])
    clean, clean_out, none = round_of(["c0", "c2"])
    assert list(rejected) == ["c1"] and "scales must be finite" in rejected["c1"] and none == {}
    assert out.metrics["weights"] == clean_out.metrics["weights"] == pytest.approx({"c0": 1 / 7, "c2": 6 / 7})
    for n in SPEC:
        assert torch.equal(core.params[n], clean.params[n])
    assert list(tmp_path.iterdir()) == []  # refused and folded updates alike: spill files gone
