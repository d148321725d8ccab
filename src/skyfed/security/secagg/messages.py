"""Secure-aggregation control messages inside skyfed's wire container, so that they
ride any transport as ordinary payload bytes (framed, CRC-checked, counted and billed
like updates): the message is the header's ``secagg`` field and the tensor blob is
empty.
"""

from __future__ import annotations

from typing import Any

from skyfed.compression.wire import pack, read_header
from skyfed.errors import SecAggError, WireFormatError

STAGES = ("keys", "shares", "unmask")


def pack_control(stage: str, round: int, body: dict[str, Any], **header: Any) -> bytes:
    if stage not in STAGES:
        raise SecAggError(f"secure aggregation: unknown stage {stage!r}")
    return pack({}, {**header, "kind": "secagg", "stage": stage, "round": round, "secagg": body})


def unpack_control(data: bytes | memoryview, stage: str, round: int, max_bytes: int | None = None) -> dict[str, Any]:
    """The message of a control payload; wrong kind, stage or round is a SecAggError."""
    try:
        header, _ = read_header(data, max_bytes)
    except WireFormatError as exc:
        raise SecAggError(f"secure aggregation: bad {stage} message: {exc}") from None
    if header.get("kind") != "secagg" or header.get("stage") != stage or header.get("round") != round:
        raise SecAggError(
            f"secure aggregation: expected a round {round} {stage} message, got "
            f"{header.get('kind')} {header.get('stage')} of round {header.get('round')}"
        )
    body = header.get("secagg")
    if not isinstance(body, dict):
        raise SecAggError(f"secure aggregation: the {stage} message has no body")
    return body
