"""The wire container: a small JSON header followed by a safetensors blob.

Layout (all integers little-endian)::

    b"SKYFED" | u16 format version | u32 header length | header JSON | safetensors bytes

The header carries the format version, the codec chain, the tensor specs (name, shape,
dtype of the *decoded* tensors), round, client, the blob length and a CRC-32 of the
blob. `unpack` validates all of it before any tensor is returned, so a corrupt or
malicious payload raises `WireFormatError` and never reaches the model.
"""

from __future__ import annotations

import json
import struct
import zlib
from dataclasses import dataclass
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from skyfed.errors import PayloadTooLargeError, WireFormatError

MAGIC = b"SKYFED"
FORMAT_VERSION = 1
_PREFIX = struct.Struct("<6sHI")
MAX_HEADER_BYTES = 16 * 2**20


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


def read_header(data: bytes | memoryview, max_bytes: int | None = None) -> tuple[dict[str, Any], memoryview]:
    """Validate the framing and return (header, blob) without decoding tensors."""
    view = memoryview(data)
    if max_bytes is not None and len(view) > max_bytes:
        raise PayloadTooLargeError(f"payload of {len(view)} bytes exceeds the maximum of {max_bytes} bytes")
    if len(view) < _PREFIX.size:
        raise WireFormatError(f"payload truncated: {len(view)} bytes is shorter than the {_PREFIX.size}-byte prefix")
    magic, version, head_len = _PREFIX.unpack_from(view, 0)
    if magic != MAGIC:
        raise WireFormatError("not a skyfed payload (bad magic bytes)")
    if version != FORMAT_VERSION:
        raise WireFormatError(f"unsupported wire format version {version} (this skyfed reads {FORMAT_VERSION})")
    if head_len > MAX_HEADER_BYTES or _PREFIX.size + head_len > len(view):
        raise WireFormatError(f"payload truncated or corrupt: header length {head_len} does not fit")
    try:
        header = json.loads(bytes(view[_PREFIX.size : _PREFIX.size + head_len]))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise WireFormatError(f"corrupt payload header: {exc}") from None
    if not isinstance(header, dict) or not isinstance(header.get("blob_bytes"), int):
        raise WireFormatError("corrupt payload header: missing blob_bytes")
    blob = view[_PREFIX.size + head_len :]
    if len(blob) != header["blob_bytes"]:
        raise WireFormatError(f"payload truncated: expected {header['blob_bytes']} tensor bytes, got {len(blob)}")
    if zlib.crc32(blob) != header.get("crc32"):
        raise WireFormatError("payload corrupted: CRC-32 checksum mismatch")
    return header, blob


def unpack(data: bytes | memoryview, max_bytes: int | None = None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Validate and deserialize a payload into (encoded tensors, header)."""
    header, blob = read_header(data, max_bytes)
    return load_blob(blob), header


def load_blob(blob: memoryview) -> dict[str, torch.Tensor]:
    """Deserialize a validated payload's safetensors blob (copies; see `views.blob_views`)."""
    try:
        return st_load(bytes(blob))
    except Exception as exc:  # safetensors raises its own error types
        raise WireFormatError(f"corrupt tensor data: {exc}") from None


def all_finite(t: torch.Tensor) -> bool:
    """No NaN or Inf in `t`. Fast path: a sum is finite only if every value is (one pass,
    no mask); only a non-finite sum (a bad value, or an overflow) pays the exact check."""
    return bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all())


def check_tensors(
    tensors: dict[str, torch.Tensor], expected: dict[str, TensorSpec], what: str = "update"
) -> None:
    """Names, shapes, dtypes and finiteness must match what the model expects."""
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing {missing[:3]}{'...' if len(missing) > 3 else ''}")
        if extra:
            parts.append(f"unexpected {extra[:3]}{'...' if len(extra) > 3 else ''}")
        raise WireFormatError(f"{what} does not match the model's parameters: {'; '.join(parts)}")
    for name, spec in expected.items():
        t = tensors[name]
        if tuple(t.shape) != spec.shape:
            raise WireFormatError(f"{what}: tensor {name!r} has shape {tuple(t.shape)}, expected {spec.shape}")
        if t.dtype != spec.dtype:
            raise WireFormatError(f"{what}: tensor {name!r} has dtype {_dtype_name(t.dtype)}, expected {_dtype_name(spec.dtype)}")
        if t.is_floating_point() and not all_finite(t):
            raise WireFormatError(f"{what}: tensor {name!r} contains NaN or Inf values")
