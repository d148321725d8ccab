"""A masked ring vector in skyfed's wire container, so it can be a `ClientResult.payload`.

The vector travels as one safetensors tensor ``secagg.masked`` (int16 or int32 holding
the ring's bits; safetensors stores little-endian) under a header that says
``"secagg": {"ring_bits", "session", "weight"}`` and an empty codec chain, inside the
usual framing (magic, version, CRC-32, size limit; `compression.wire`). Unpacking checks
the framing, the ring, the session and the length before the server folds anything.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from skyfed.compression.wire import load_blob, pack, read_header
from skyfed.errors import WireFormatError
from skyfed.security.secagg.crypto import b64e
from skyfed.security.secagg.session import SecAggParams

TENSOR = "secagg.masked"
_SIGNED = {16: np.int16, 32: np.int32}


def pack_masked(masked: bytes, params: SecAggParams, session: bytes, weight: float, **header: Any) -> bytes:
    """Wire bytes for a masked vector (the bytes `SecAggClient.mask` returned)."""
    if len(masked) != params.vector_bytes:
        raise WireFormatError(f"masked vector of {len(masked)} bytes, expected {params.vector_bytes}")
    values = np.frombuffer(masked, dtype=np.dtype(_SIGNED[params.ring_bits]).newbyteorder("<")).astype(_SIGNED[params.ring_bits])
    header.update(codecs=[], secagg={"ring_bits": params.ring_bits, "session": b64e(session), "weight": float(weight)})
    return pack({TENSOR: torch.from_numpy(values)}, header)


def unpack_masked(data: bytes | memoryview, params: SecAggParams, session: bytes,
                  max_bytes: int | None = None) -> tuple[bytes, float, dict[str, Any]]:
    """(masked vector bytes, public weight, header) from wire bytes, all checked."""
    header, blob = read_header(data, max_bytes)
    info = header.get("secagg")
    if not isinstance(info, dict) or header.get("codecs") != []:
        raise WireFormatError("not a secure-aggregation payload (no secagg header)")
    if info.get("ring_bits") != params.ring_bits or info.get("session") != b64e(session):
        raise WireFormatError("secure-aggregation payload of another ring or session")
    weight = info.get("weight")
    if not isinstance(weight, (int, float)) or not 0 < weight <= 1:
        raise WireFormatError(f"secure-aggregation payload: weight must be in (0, 1], got {weight!r}")
    tensors = load_blob(blob)
    t = tensors.get(TENSOR)
    want = torch.int16 if params.ring_bits == 16 else torch.int32
    if set(tensors) != {TENSOR} or t is None or t.dtype != want or tuple(t.shape) != (params.dim,):
        raise WireFormatError(f"secure-aggregation payload must hold {TENSOR!r}: {params.dim} values of {want}")
    return t.numpy().astype(np.dtype(_SIGNED[params.ring_bits]).newbyteorder("<"), copy=False).tobytes(), float(weight), header
