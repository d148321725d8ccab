"""Encode named tensors into wire bytes through a codec chain, and back with full validation.

The header records the chain (each codec's name and parameters, including the seeds a
receiver needs for random-k), so a payload decodes on its own. `decode_payload` checks
the framing (size limit, magic, version, CRC-32, truncation), rebuilds the chain
(unknown codec or bad parameters are rejected), validates every encoded part (names,
dtypes, shapes, index ranges, NaN/Inf) and only then returns decoded float32 tensors,
each value at most `max_abs` (default `wire.MAX_ABS`) in magnitude. Every failure is a
`WireFormatError` (or `PayloadTooLargeError`) with a clear one-line message: an
exception of any other type raised while decoding (a defect the checks missed) is
logged as an error and turned into a `WireFormatError` that names its type, so bytes
from the network can never raise anything else.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from skyfed.compression.chain import Chain
from skyfed.compression.views import blob_views
from skyfed.compression.wire import MAX_ABS, TensorSpec, check_specs, check_tensors, load_blob, pack, read_header, spec_of
from skyfed.errors import WireFormatError

log = logging.getLogger(__name__)


def encode_payload(tensors: dict[str, torch.Tensor], chain: Chain | None = None, **header: Any) -> bytes:
    """Serialize `tensors` through `chain` (None or empty = plain fp32) with header fields
    such as kind, round and client."""
    chain = chain or Chain([])
    return pack_parts(chain.encode(tensors), chain, **header)


def pack_parts(parts: dict[str, torch.Tensor], chain: Chain, **header: Any) -> bytes:
    """Serialize parts already encoded by `chain`, recording the chain in the header."""
    header["codecs"] = chain.specs()
    return pack(parts, header)


def decode_payload(
    data: bytes | memoryview,
    expected: dict[str, TensorSpec],
    max_bytes: int | None = None,
    what: str = "payload",
    views: bool = False,
    max_abs: float | None = MAX_ABS,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Validate framing, codec chain, names, shapes, dtypes and values; decode.

    With `views`, a plain payload (no codecs) is not copied: its tensors are read-only
    views into `data` (`compression.views.blob_views`) that keep `data` alive.
    `max_abs` bounds every decoded value (None: finite only)."""
    return _guarded(what, lambda: _decode(*read_header(data, max_bytes), expected, what, views, max_abs))


def decode_checked(
    header: dict[str, Any], blob: memoryview, expected: dict[str, TensorSpec], what: str = "payload",
    views: bool = False, max_abs: float | None = MAX_ABS, values_checked: bool = False,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """`decode_payload` of a payload whose framing and CRC-32 `read_header` has checked;
    `values_checked`: a plain one whose values were checked as it arrived
    (`streamcheck.BlobCheck`), so only names, shapes and dtypes are checked again."""
    return _guarded(what, lambda: _decode(header, blob, expected, what, views, max_abs, values_checked))


def _guarded(what: str, decode):
    try:
        return decode()
    except WireFormatError:
        raise
    except Exception as exc:  # a defect the checks missed: still only a refusal
        reason = str(exc).splitlines()[0][:200] if str(exc) else ""
        log.error("%s: unexpected %s while decoding (a skyfed defect): %s", what, type(exc).__name__, reason)
        raise WireFormatError(f"{what}: undecodable payload ({type(exc).__name__})") from exc


def _decode(
    header: dict[str, Any], blob: memoryview, expected: dict[str, TensorSpec], what: str, views: bool,
    max_abs: float | None, values_checked: bool = False,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    try:
        chain = Chain.from_specs(header.get("codecs", []))
    except WireFormatError as exc:
        raise WireFormatError(f"{what}: {exc}") from None
    if views and not chain:
        tensors = blob_views(blob)
    else:
        parts = load_blob(blob)
        tensors = chain.decode(parts, expected, what) if chain else parts
    if values_checked and not chain:
        check_specs(spec_of(tensors), expected, what)
    else:
        check_tensors(tensors, expected, what, max_abs)
    return tensors, header
