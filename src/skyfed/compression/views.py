"""Read a safetensors blob as tensors that are views into the received bytes (no copy).

`safetensors.torch.load` copies the whole blob (`bytes(...)`) and then every tensor out
of it: a 400 MB plain-fp32 update costs 800 MB more while it is decoded. `blob_views`
parses the safetensors header itself and returns `torch.frombuffer` views over the
payload, so the receive buffer is the only copy. The header is parsed by
`strictjson.loads` (bounded depth, no NaN/Infinity, 64-bit integers) and every entry's
dtype, shape, offsets and size are checked against the bytes present before any view
is made; anything malformed is a `WireFormatError`. The views share memory
with the payload: callers must not write to them (the engine only reads updates).
"""

from __future__ import annotations

import math
import struct
import warnings
from dataclasses import dataclass

import torch

from skyfed.compression import strictjson
from skyfed.errors import WireFormatError

MAX_META_BYTES = 16 * 2**20  # the safetensors header (one short entry per tensor)
MAX_DIMS = 8

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


def blob_views(blob: memoryview) -> dict[str, torch.Tensor]:
    """Named tensors over `blob` (a safetensors serialization), validated, without copies."""
    entries, data_start = blob_layout(blob, len(blob))
    data = blob[data_start:]
    return {name: _view(data, e) for name, e in entries.items()}


@dataclass(frozen=True)
class Entry:
    """Where one tensor's bytes lie in a safetensors blob's data section."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int
    end: int


def blob_layout(head: bytes | memoryview, blob_len: int) -> tuple[dict[str, Entry], int]:
    """The checked entries of a `blob_len`-byte safetensors blob whose first bytes are
    `head` (at least its 8-byte length and JSON header), and where its data starts."""
    if blob_len < 8 or len(head) < 8:
        raise WireFormatError("corrupt tensor data: blob shorter than its 8-byte header length")
    (n,) = struct.unpack_from("<Q", head, 0)
    if n > blob_len - 8 or n > MAX_META_BYTES:
        raise WireFormatError(f"corrupt tensor data: header length {n} does not fit")
    meta = strictjson.loads(memoryview(head)[8 : 8 + n], "corrupt tensor data")
    if not isinstance(meta, dict):
        raise WireFormatError("corrupt tensor data: header is not a JSON object")
    extra = meta.get("__metadata__")
    if extra is not None and not (isinstance(extra, dict) and all(isinstance(v, str) for v in extra.values())):
        raise WireFormatError("corrupt tensor data: __metadata__ must map names to strings")
    data_len = blob_len - 8 - n
    entries = {name: _entry(data_len, name, info) for name, info in meta.items() if name != "__metadata__"}
    return entries, 8 + n


def layout_head_bytes(head: bytes | memoryview) -> int:
    """How many leading bytes of a blob `blob_layout` needs (from its first 8 bytes)."""
    (n,) = struct.unpack_from("<Q", head, 0)
    return 8 + min(n, MAX_META_BYTES + 1)


def _int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _entry(data_len: int, name: str, info: object) -> Entry:
    bad = f"corrupt tensor data: bad entry for tensor {name[:80]!r}"
    if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
        raise WireFormatError(f"{bad} (it needs exactly dtype, shape and data_offsets)")
    dtype = DTYPES.get(info["dtype"]) if isinstance(info["dtype"], str) else None
    shape, offsets = info["shape"], info["data_offsets"]
    if dtype is None:
        raise WireFormatError(f"{bad} (dtype {str(info['dtype'])[:20]!r} is not one of {', '.join(DTYPES)})")
    if not isinstance(shape, list) or len(shape) > MAX_DIMS or not all(_int(d) for d in shape):
        raise WireFormatError(f"{bad} (shape must list at most {MAX_DIMS} non-negative integers)")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_int(x) for x in offsets):
        raise WireFormatError(f"{bad} (data_offsets must be two non-negative integers)")
    begin, end = offsets
    size = torch.empty((), dtype=dtype).element_size()
    if math.prod(max(d, 1) for d in shape) > 2**62:  # torch's strides must fit in int64
        raise WireFormatError(f"{bad} (shape {shape} is too large)")
    count = math.prod(shape)
    if not begin <= end <= data_len or end - begin != count * size:
        raise WireFormatError(f"corrupt tensor data: tensor {name[:80]!r} does not fit its offsets")
    return Entry(dtype, tuple(shape), begin, end)


def _view(data: memoryview, e: Entry) -> torch.Tensor:
    count = math.prod(e.shape)
    if count == 0:
        return torch.empty(e.shape, dtype=e.dtype)
    with warnings.catch_warnings():  # a read-only `bytes` payload: the views are only read
        warnings.filterwarnings("ignore", message="The given buffer is not writable")
        return torch.frombuffer(data, dtype=e.dtype, count=count, offset=e.begin).view(e.shape)
