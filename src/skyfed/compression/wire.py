"""The wire container: a small JSON header followed by a safetensors blob.

Layout (all integers little-endian)::

    b"SKYFED" | u16 format version | u32 header length | header JSON | safetensors bytes

The header carries the format version, the codec chain, the tensor specs (name, shape,
dtype of the *decoded* tensors), round, client, the blob length and a CRC-32 of the
blob. `unpack` validates all of it before any tensor is returned, so a corrupt or
malicious payload raises `WireFormatError` and never reaches the model: the header is
parsed by `strictjson.loads` (bounded depth, no NaN/Infinity, 64-bit integers) and each
field the library reads is type- and range-checked (`check_header`).

`check_tensors` refuses names, shapes and dtypes the model does not have, non-finite
values and values above `max_abs` (default `MAX_ABS` = 1e30: fp32 overflows at 3.4e38,
so the sum of up to 10^8 accepted updates stays finite). `check_norm` is the optional
L2 bound a server may add on a whole update.
"""

from __future__ import annotations

import json
import math
import struct
import zlib
from dataclasses import dataclass
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from skyfed.compression import strictjson
from skyfed.errors import PayloadTooLargeError, WireFormatError

MAGIC = b"SKYFED"
FORMAT_VERSION = 1
_PREFIX = struct.Struct("<6sHI")
MAX_HEADER_BYTES = 16 * 2**20
MAX_ABS = 1e30  # the default bound on any decoded value (see the module docstring)
_U32 = 2**32
# Header fields the library reads: (allowed types, lowest value for integers, highest).
# The codec chain is checked when it is built (`Chain.from_specs`).
_FIELDS: dict[str, tuple[tuple[type, ...], int, int]] = {
    "format": ((int,), FORMAT_VERSION, FORMAT_VERSION),
    "blob_bytes": ((int,), 0, 2**62),
    "crc32": ((int,), 0, _U32 - 1),
    "round": ((int,), 0, 2**62),
    "version": ((int,), 0, 2**62),
    "base_version": ((int,), 0, 2**62),
    "tag": ((int, type(None)), 0, 2**62),
    "base_tag": ((int, type(None)), 0, 2**62),
    "base_crc": ((int, type(None)), 0, _U32 - 1),
    "kind": ((str,), 0, 0),
    "client": ((str,), 0, 0),
}
_REQUIRED = ("format", "blob_bytes", "crc32")
PREFIX_BYTES = _PREFIX.size
CRC_MISMATCH = "payload corrupted: CRC-32 checksum mismatch"


@dataclass(frozen=True)
class TensorSpec:
    shape: tuple[int, ...]
    dtype: torch.dtype


def spec_of(tensors: dict[str, torch.Tensor]) -> dict[str, TensorSpec]:
    return {name: TensorSpec(tuple(t.shape), t.dtype) for name, t in tensors.items()}


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def pack(tensors: dict[str, torch.Tensor], header: dict[str, Any]) -> bytes:
    """Serialize named tensors (already encoded by codecs) with a JSON header."""
    cpu = {name: t.detach().contiguous().cpu() for name, t in tensors.items()}
    blob = st_save(cpu)
    full = dict(header)
    full.update(format=FORMAT_VERSION, blob_bytes=len(blob), crc32=zlib.crc32(blob))
    head = json.dumps(full, separators=(",", ":")).encode()
    return _PREFIX.pack(MAGIC, FORMAT_VERSION, len(head)) + head + blob


class Framed(bytearray):
    """Wire bytes whose framing and CRC-32 were checked as they arrived
    (`compression.framing.FrameReader`): `read_header` returns the header recorded then
    and does not check the bytes a second time. Until `checked` is called it is a plain
    bytearray (checked in full by `read_header`)."""

    header: dict[str, Any] | None = None
    blob_start: int = 0
    verdict: str | None = None  # the values' check on arrival (`streamcheck.BlobCheck`), if any

    def checked(self, header: dict[str, Any], blob_start: int, verdict: str | None = None) -> "Framed":
        self.header, self.blob_start, self.verdict = header, blob_start, verdict
        return self


def parse_prefix(prefix: bytes | memoryview, total: int) -> int:
    """The header length from the fixed prefix (magic, format version) of a `total`-byte payload."""
    if total < _PREFIX.size:
        raise WireFormatError(f"payload truncated: {total} bytes is shorter than the {_PREFIX.size}-byte prefix")
    magic, version, head_len = _PREFIX.unpack_from(prefix, 0)
    if magic != MAGIC:
        raise WireFormatError("not a skyfed payload (bad magic bytes)")
    if version != FORMAT_VERSION:
        raise WireFormatError(f"unsupported wire format version {version} (this skyfed reads {FORMAT_VERSION})")
    if head_len > MAX_HEADER_BYTES or _PREFIX.size + head_len > total:
        raise WireFormatError(f"payload truncated or corrupt: header length {head_len} does not fit")
    return head_len


def parse_head(head: bytes | memoryview, blob_len: int) -> dict[str, Any]:
    """The JSON header, checked (`check_header`), for a blob of `blob_len` bytes."""
    header = strictjson.loads(head, "corrupt payload header")
    check_header(header)
    if blob_len != header["blob_bytes"]:
        raise WireFormatError(f"payload truncated: expected {header['blob_bytes']} tensor bytes, got {blob_len}")
    return header


def check_size(size: int, max_bytes: int | None) -> None:
    if max_bytes is not None and size > max_bytes:
        raise PayloadTooLargeError(f"payload of {size} bytes exceeds the maximum of {max_bytes} bytes")


def read_header(data: bytes | memoryview, max_bytes: int | None = None) -> tuple[dict[str, Any], memoryview]:
    """Validate the framing and return (header, blob) without decoding tensors. A
    `Framed` payload was checked as it arrived: its recorded header is returned."""
    view = memoryview(data)
    check_size(len(view), max_bytes)
    if isinstance(data, Framed) and data.header is not None:
        return data.header, view[data.blob_start :]
    head_len = parse_prefix(view, len(view))
    start = _PREFIX.size + head_len
    header = parse_head(view[_PREFIX.size : start], len(view) - start)
    blob = view[start:]
    if zlib.crc32(blob) != header.get("crc32"):
        raise WireFormatError(CRC_MISMATCH)
    return header, blob


def check_header(header: Any) -> None:
    """The fields the library reads have the right types and ranges; WireFormatError if not."""
    if not isinstance(header, dict):
        raise WireFormatError("corrupt payload header: not a JSON object")
    for name in _REQUIRED:
        if name not in header:
            raise WireFormatError(f"corrupt payload header: missing {name}")
    for name, (types, low, high) in _FIELDS.items():
        if name not in header:
            continue
        value = header[name]
        if isinstance(value, bool) or not isinstance(value, types):
            allowed = " or ".join("null" if t is type(None) else t.__name__ for t in types)
            raise WireFormatError(f"corrupt payload header: {name} must be {allowed}, got {type(value).__name__}")
        if isinstance(value, int) and not low <= value <= high:
            raise WireFormatError(f"corrupt payload header: {name}={value} is outside [{low}, {high}]")


def unpack(data: bytes | memoryview, max_bytes: int | None = None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Validate and deserialize a payload into (encoded tensors, header)."""
    header, blob = read_header(data, max_bytes)
    return load_blob(blob), header


def load_blob(blob: memoryview) -> dict[str, torch.Tensor]:
    """Deserialize a validated payload's safetensors blob (copies; see `views.blob_views`)."""
    try:
        return st_load(bytes(blob))
    except Exception as exc:  # safetensors raises its own error types; its message quotes the input
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise WireFormatError(f"corrupt tensor data: {reason[:200]}{'...' if len(reason) > 200 else ''}") from None


def value_error(t: torch.Tensor, max_abs: float | None = MAX_ABS) -> str | None:
    """Why the float tensor `t` is unacceptable (NaN/Inf, or a value above `max_abs`), or
    None. One pass (`torch.aminmax`, which propagates NaN), no temporary tensor."""
    if t.numel() == 0:
        return None
    lo, hi = (float(v) for v in torch.aminmax(t.detach()))
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return "contains NaN or Inf values"
    if max_abs is not None and max(-lo, hi) > max_abs:
        return f"has a value of magnitude {max(-lo, hi):.3g}, above the bound of {max_abs:.3g}"
    return None


def update_norm(tensors: dict[str, torch.Tensor]) -> float:
    """The L2 norm of all tensors together, accumulated in float64 (no overflow)."""
    total = 0.0
    for t in tensors.values():
        total += float(torch.linalg.vector_norm(t.detach(), dtype=torch.float64)) ** 2
    return math.sqrt(total)


def check_norm(tensors: dict[str, torch.Tensor], max_norm: float, what: str = "update") -> float:
    """Refuse (WireFormatError) an update whose L2 norm exceeds `max_norm`; return the norm."""
    norm = update_norm(tensors)
    if not norm <= max_norm:
        raise WireFormatError(f"{what}: L2 norm {norm:.4g} exceeds the bound of {max_norm:.4g}")
    return norm


def all_finite(t: torch.Tensor) -> bool:
    """No NaN or Inf in `t`. Fast path: a sum is finite only if every value is (one pass,
    no mask); only a non-finite sum (a bad value, or an overflow) pays the exact check."""
    return bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all())


def check_tensors(
    tensors: dict[str, torch.Tensor], expected: dict[str, TensorSpec], what: str = "update",
    max_abs: float | None = MAX_ABS,
) -> None:
    """Names, shapes and dtypes must match what the model expects; float values must be
    finite and at most `max_abs` in magnitude (None: finite only)."""
    check_specs(spec_of(tensors), expected, what)
    for name in expected:
        t = tensors[name]
        problem = value_error(t, max_abs) if t.is_floating_point() else None
        if problem is not None:
            raise WireFormatError(f"{what}: tensor {name!r} {problem}")


def check_specs(found: dict[str, TensorSpec], expected: dict[str, TensorSpec], what: str = "update") -> None:
    """`check_tensors` without the values: the same names, shapes and dtypes."""
    missing = sorted(set(expected) - set(found))
    extra = sorted(set(found) - set(expected))
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing {missing[:3]}{'...' if len(missing) > 3 else ''}")
        if extra:
            parts.append(f"unexpected {[n[:60] for n in extra[:3]]}{'...' if len(extra) > 3 else ''}")
        raise WireFormatError(f"{what} does not match the model's parameters: {'; '.join(parts)}")
    for name, spec in expected.items():
        t = found[name]
        if tuple(t.shape) != spec.shape:
            raise WireFormatError(f"{what}: tensor {name!r} has shape {tuple(t.shape)}, expected {spec.shape}")
        if t.dtype != spec.dtype:
            raise WireFormatError(f"{what}: tensor {name!r} has dtype {_dtype_name(t.dtype)}, expected {_dtype_name(spec.dtype)}")
