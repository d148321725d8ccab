import struct

import pytest
import torch

from skyfed.compression.wire import check_tensors, pack, spec_of, unpack
from skyfed.errors import PayloadTooLargeError, WireFormatError

T = {"a.weight": torch.arange(12, dtype=torch.float32).reshape(3, 4), "b.bias": torch.ones(5)}


def test_round_trip_is_exact_and_header_kept():
    data = pack(T, {"kind": "update", "round": 3, "client": "aws"})
    tensors, header = unpack(data)
    assert header["round"] == 3 and header["client"] == "aws" and header["format"] == 1
    for name in T:
        assert torch.equal(tensors[name], T[name])
    # the payload is the tensors plus a small header: 68 bytes of fp32 data + framing
    assert 17 * 4 < len(data) < 17 * 4 + 400


@pytest.mark.parametrize(
    "mangle, message",
    [
        (lambda d: d[:-3], "truncated"),
        (lambda d: d[:5], "shorter than"),
        (lambda d: b"XXXXXX" + d[6:], "bad magic"),
        (lambda d: d[:6] + struct.pack("<H", 9) + d[8:], "unsupported wire format version 9"),
        (lambda d: d[:-1] + bytes([d[-1] ^ 0xFF]), "checksum mismatch"),
        (lambda d: d[:12] + b"X" + d[13:], "corrupt payload header"),
    ],
)
def test_corrupt_payloads_are_rejected(mangle, message):
    data = pack(T, {"kind": "update"})
    with pytest.raises(WireFormatError, match=message):
        unpack(mangle(data))


def test_size_limit():
    data = pack(T, {})
    with pytest.raises(PayloadTooLargeError, match=f"payload of {len(data)} bytes exceeds the maximum of 10 bytes"):
        unpack(data, max_bytes=10)


def test_check_tensors_names_shapes_dtypes_and_nan():
    spec = spec_of(T)
    check_tensors(T, spec)
    with pytest.raises(WireFormatError, match=r"missing \['b.bias'\]"):
        check_tensors({"a.weight": T["a.weight"]}, spec)
    with pytest.raises(WireFormatError, match=r"'a.weight' has shape \(4, 3\), expected \(3, 4\)"):
        check_tensors({**T, "a.weight": torch.zeros(4, 3)}, spec)
    with pytest.raises(WireFormatError, match="has dtype float16, expected float32"):
        check_tensors({**T, "b.bias": torch.ones(5, dtype=torch.float16)}, spec)
    bad = T["b.bias"].clone()
    bad[2] = float("nan")
    with pytest.raises(WireFormatError, match="'b.bias' contains NaN or Inf"):
        check_tensors({**T, "b.bias": bad}, spec)
