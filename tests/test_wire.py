"""Payloads through codec chains: header records the chain; every kind of bad payload is
rejected with a typed error and a clear message."""

import json
import struct
import zlib

import pytest
import torch
from safetensors.torch import save as st_save

from skyfed.compression.chain import Chain
from skyfed.compression.payload import decode_payload, encode_payload
from skyfed.compression.wire import MAGIC, FORMAT_VERSION, pack, spec_of
from skyfed.errors import PayloadTooLargeError, WireFormatError

T = {"w": torch.randn(40, 30), "b": torch.randn(30)}
SPEC = spec_of(T)
TOPK8 = [{"name": "topk", "fraction": 0.1}, {"name": "int8", "block": 64}]


def _payload(specs=TOPK8, **header):
    return encode_payload(T, Chain.from_specs(specs), kind="update", round=3, client="aws", **header)


def _repack(parts, header):
    """A payload with valid framing and CRC around arbitrary parts and header."""
    return pack(parts, header)


def _parts(specs=TOPK8):
    return Chain.from_specs(specs).encode(T)


def _header(specs=TOPK8):
    return {"kind": "update", "codecs": Chain.from_specs(specs).specs()}


def test_header_records_chain_with_all_parameters():
    _, header = decode_payload(_payload(), SPEC)
    assert header["codecs"] == [
        {"name": "topk", "fraction": 0.1, "scope": "tensor", "exact_max": 1 << 20, "seed": 0},
        {"name": "int8", "block": 64, "stochastic": False, "seed": 0},
    ]
    assert header["round"] == 3 and header["client"] == "aws"


def test_compressed_payload_is_smaller_and_decodes():
    plain, small = encode_payload(T), _payload()
    out, _ = decode_payload(small, SPEC)
    assert len(small) < len(plain) / 3
    assert set(out) == set(T) and all(out[k].shape == T[k].shape and out[k].dtype == torch.float32 for k in T)


def expect_error(data, match, cls=WireFormatError, **kw):
    with pytest.raises(cls) as info:
        decode_payload(data, SPEC, what="update from aws", **kw)
    assert match in str(info.value), str(info.value)
    return str(info.value)


def test_truncated_and_corrupted_payloads():
    data = _payload()
    expect_error(data[:-5], "payload truncated")
    expect_error(data[:10], "payload truncated")
    flipped = bytearray(data)
    flipped[-3] ^= 0xFF
    expect_error(bytes(flipped), "CRC-32 checksum mismatch")
    expect_error(b"NOTSKY" + data[6:], "bad magic")


def test_oversize_payload():
    expect_error(_payload(), "exceeds the maximum", PayloadTooLargeError, max_bytes=100)


def test_unknown_codec_and_bad_codec_params():
    h = _header()
    h["codecs"][1]["name"] = "int3"
    expect_error(_repack(_parts(), h), "unknown codec 'int3'")
    h = _header()
    h["codecs"][1]["block"] = -1
    expect_error(_repack(_parts(), h), "int8.block must be an integer")
    h = _header()
    h["codecs"] = "topk"
    expect_error(_repack(_parts(), h), "a codec chain is a list")


def test_wrong_names_shapes_and_dtypes_of_parts():
    parts = _parts()
    extra = dict(parts, **{"evil::0.idx": parts["w::0.idx"].clone()})
    expect_error(_repack(extra, _header()), "unexpected encoded tensor 'evil::0.idx'")
    missing = {k: v for k, v in parts.items() if not k.startswith("b::")}
    expect_error(_repack(missing, _header()), "missing encoded tensors for ['b']")
    no_scale = {k: v for k, v in parts.items() if k != "w::1.scale"}
    expect_error(_repack(no_scale, _header()), "encoded parts ['q'], expected ['q', 'scale']")
    wrong_dtype = dict(parts, **{"w::1.scale": parts["w::1.scale"].to(torch.float64)})
    expect_error(_repack(wrong_dtype, _header()), "encoded part 'scale' is float64")
    short_q = dict(parts, **{"w::1.q": parts["w::1.q"][:-1]})
    expect_error(_repack(short_q, _header()), "encoded part 'q' is int8 (119,), expected int8 (120,)")
    # a chain recorded as shorter than the parts sent
    h = _header()
    h["codecs"] = h["codecs"][:1]
    expect_error(_repack(parts, h), "unexpected encoded tensor")


def test_index_out_of_range_and_duplicates():
    parts = _parts([{"name": "topk", "fraction": 0.1}])
    low = parts["b::0.idx"].clone()
    low[-1] = 30  # b has 30 values: index 30 is out of range
    low[:-1] = torch.arange(low.numel() - 1, dtype=torch.int16)
    expect_error(_repack(dict(parts, **{"b::0.idx": low}), _header([{"name": "topk", "fraction": 0.1}])), "index 30 out of range")
    dup = parts["w::0.idx"].clone()
    dup[1] = dup[0]
    expect_error(_repack(dict(parts, **{"w::0.idx": dup}), _header([{"name": "topk", "fraction": 0.1}])), "not strictly increasing")
    counts = parts["w::0.count"].clone()
    counts[0] += 1
    expect_error(_repack(dict(parts, **{"w::0.count": counts}), _header([{"name": "topk", "fraction": 0.1}])), "do not add up")


def test_nan_and_inf_are_rejected_in_every_representation():
    parts = _parts([{"name": "topk", "fraction": 0.1}])
    v = parts["w::0.values"].clone()
    v[2] = float("nan")
    expect_error(_repack(dict(parts, **{"w::0.values": v}), _header([{"name": "topk", "fraction": 0.1}])), "NaN or Inf")
    parts = _parts(["int8"])
    s = parts["w::0.scale"].clone()
    s[0] = float("inf")
    expect_error(_repack(dict(parts, **{"w::0.scale": s}), _header(["int8"])), "scales must be finite")
    parts = _parts(["fp16"])
    v = parts["b::0.v"].clone()
    v[0] = float("inf")
    expect_error(_repack(dict(parts, **{"b::0.v": v}), _header(["fp16"])), "NaN or Inf")
    bad = dict(T, w=T["w"].clone())
    bad["w"][0, 0] = float("nan")
    expect_error(encode_payload(bad), "NaN or Inf")


def test_out_of_range_quantized_values():
    parts = _parts(["int8"])
    q = parts["w::0.q"].clone()
    q[0] = -128
    expect_error(_repack(dict(parts, **{"w::0.q": q}), _header(["int8"])), "outside the codec's range")
    parts = _parts(["int4"])
    q = parts["w::0.q"].clone()
    q[0] = 0
    expect_error(_repack(dict(parts, **{"w::0.q": q}), _header(["int4"])), "outside the codec's range")


def test_mismatched_model_shape_is_rejected():
    data = encode_payload({"w": torch.randn(40, 31), "b": torch.randn(30)}, Chain.from_specs(["int8"]))
    expect_error(data, "encoded part 'q' is int8 (1240,), expected int8 (1200,)")
