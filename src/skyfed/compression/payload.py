"""Encode named tensors into wire bytes and back, validating against the model.

The foundation sends plain fp32 tensors (codec chain ``[]``); codecs plug in here.
"""

from __future__ import annotations

from typing import Any

import torch

from skyfed.compression.wire import TensorSpec, check_tensors, pack, unpack
from skyfed.errors import WireFormatError


def encode_payload(tensors: dict[str, torch.Tensor], **header: Any) -> bytes:
    """Serialize `tensors` with header fields such as kind, round and client."""
    header.setdefault("codecs", [])
    return pack(tensors, header)


def decode_payload(
    data: bytes | memoryview,
    expected: dict[str, TensorSpec],
    max_bytes: int | None = None,
    what: str = "payload",
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Validate framing, codec chain, names, shapes, dtypes and finiteness."""
    tensors, header = unpack(data, max_bytes)
    if header.get("codecs"):
        raise WireFormatError(f"{what}: unknown codec chain {header['codecs']!r}")
    check_tensors(tensors, expected, what)
    return tensors, header
