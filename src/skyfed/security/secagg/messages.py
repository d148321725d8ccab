"""Secure-aggregation control messages inside skyfed's wire container, so that they
ride any transport as ordinary payload bytes (framed, CRC-checked, counted and billed
like updates): the message is the header's ``secagg`` field and the tensor blob is
empty.

`max_control_bytes` bounds a control message's size from the session's client names, so
a front door (the gRPC servicer) refuses a larger one from its announcement;
`check_control_header` is the check both the front door and the coordinator apply.
"""

from __future__ import annotations

import json
from typing import Any

from skyfed.compression.wire import pack, read_header
from skyfed.errors import SecAggError, WireFormatError

STAGES = ("keys", "shares", "unmask")
_EMPTY_BLOB = 16  # an empty safetensors blob is 8 + 2 bytes ("{}"), padded to 8


def pack_control(stage: str, round: int, body: dict[str, Any], **header: Any) -> bytes:
    if stage not in STAGES:
        raise SecAggError(f"secure aggregation: unknown stage {stage!r}")
    return pack({}, {**header, "kind": "secagg", "stage": stage, "round": round, "secagg": body})


def max_control_bytes(names: list[str]) -> int:
    """An upper bound on any control message of a session among `names`, either way.

    The largest is a client's shares message (or the bundle of shares a holder receives):
    per peer its name and one AES-GCM box of base64 text holding two 66-byte Shamir
    shares and both names, about 300 + 2.7 x name bytes. The bound allows 1024 + 8 x the
    longest name per client, and 8 KiB for headers and fixed fields."""
    longest = max((len(json.dumps(n)) for n in names), default=2)
    return 8192 + len(names) * (1024 + 8 * longest)


def check_control_header(header: dict[str, Any], blob_bytes: int, stage: str, round: int,
                         client: str | None = None) -> dict[str, Any]:
    """The message body of a control payload's header; the header must name this kind,
    stage, round (and sending client), and the tensor blob must be empty."""
    expected = {"kind": "secagg", "stage": stage, "round": round}
    if client is not None:
        expected["client"] = client
    for key, want in expected.items():
        got = header.get(key)
        if type(got) is not type(want) or got != want:
            shown = repr(got)[:64]
            raise SecAggError(
                f"secure aggregation: expected a round {round} {stage} message, but its header says {key}={shown} "
                f"(a replayed, re-labelled or misdirected message)"
            )
    body = header.get("secagg")
    if not isinstance(body, dict):
        raise SecAggError(f"secure aggregation: the {stage} message has no body")
    if blob_bytes > _EMPTY_BLOB:
        raise SecAggError(f"secure aggregation: the {stage} message carries {blob_bytes} bytes of tensors; it must carry none")
    return body


def unpack_control(data: bytes | memoryview, stage: str, round: int, max_bytes: int | None = None,
                   client: str | None = None) -> dict[str, Any]:
    """The message of a control payload; wrong framing, kind, stage, round or client is a SecAggError."""
    try:
        header, blob = read_header(data, max_bytes)
    except WireFormatError as exc:
        raise SecAggError(f"secure aggregation: bad {stage} message: {exc}") from None
    return check_control_header(header, len(blob), stage, round, client)
