"""`read_header`'s checks on a payload that arrives in pieces.

A receiver that knows the payload's total size up front (a gRPC push announces it)
feeds each chunk to a `FrameReader` as it arrives: the prefix and the JSON header are
checked as soon as they are complete, and the CRC-32 of the blob is computed chunk by
chunk (`zlib.crc32` releases the GIL), so when the last chunk is in, the framing is
known good or refused without another pass over the bytes. The messages are those of
`wire.read_header`, after `what`. The receiver then marks its buffer `wire.Framed`, and the server
core's decode does not check the CRC again.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from typing import Any

from skyfed.compression.wire import CRC_MISMATCH, PREFIX_BYTES, check_size, parse_head, parse_prefix
from skyfed.errors import WireFormatError


class FrameReader:
    """Framing, header and CRC-32 of a `size`-byte payload, checked as its chunks pass."""

    def __init__(self, size: int, max_bytes: int | None = None, what: str = "payload",
                 blob_check: Callable[[dict[str, Any], str], Any] | None = None):
        """`blob_check(header, what)`, once the header is read: an object (or None) whose
        `feed` gets the blob's bytes in order (`streamcheck.BlobCheck`); its `verdict`
        is `self.verdict` at the end."""
        if size < 0:
            raise WireFormatError(f"{what}: negative announced size {size}")
        check_size(size, max_bytes)
        self.size = size
        self.what = what
        self.pos = 0
        self.header: dict[str, Any] | None = None
        self.blob_start = 0
        self._head = bytearray()  # the prefix and header JSON, until complete
        self._need = PREFIX_BYTES
        self._crc = 0
        self._blob_check = blob_check
        self._checker = None

    def feed(self, data: bytes | memoryview) -> None:
        n = len(data)
        if self.pos + n > self.size:
            raise WireFormatError(f"{self.what}: stream carries more than the announced {self.size} bytes")
        if self.header is None:
            try:
                data = self._take_head(memoryview(data))
            except WireFormatError as exc:
                raise type(exc)(f"{self.what}: {exc}") from None
        if len(data):
            self._crc = zlib.crc32(data, self._crc)
            if self._checker is not None:
                self._checker.feed(data)
        self.pos += n

    def _take_head(self, view: memoryview) -> memoryview:
        """Buffer header bytes; once the header is whole, check it; return the blob bytes of `view`."""
        while self.header is None and len(view):
            take = self._need - len(self._head)
            self._head += view[:take]
            view = view[take:]
            if len(self._head) < self._need:
                break
            if self._need == PREFIX_BYTES:
                self._need += parse_prefix(self._head, self.size)
                if self._need > PREFIX_BYTES:
                    continue
            self.blob_start = self._need
            self.header = parse_head(memoryview(self._head)[PREFIX_BYTES:], self.size - self.blob_start)
            self._head = bytearray()
            if self._blob_check is not None:
                self._checker = self._blob_check(self.header, self.what)
        return view

    @property
    def verdict(self) -> str | None:
        """The blob check's verdict ("" all checked and good, a problem, None: not checked)."""
        return None if self._checker is None else self._checker.verdict

    def finish(self) -> dict[str, Any]:
        """The checked header once every announced byte is in; WireFormatError if not, or if the CRC differs."""
        if self.pos != self.size:
            raise WireFormatError(f"{self.what}: stream ended after {self.pos} of the announced {self.size} bytes")
        if self.header is None:  # only a size shorter than the prefix leaves it unread
            raise WireFormatError(f"{self.what}: payload truncated: {self.size} bytes is shorter than the {PREFIX_BYTES}-byte prefix")
        if self._crc != self.header.get("crc32"):
            raise WireFormatError(f"{self.what}: {CRC_MISMATCH}")
        return self.header
