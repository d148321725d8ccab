"""Split wire bytes into stream chunks and reassemble them into one preallocated buffer.

The receiver learns the total size from the stream's header, allocates one bytearray
of exactly that size and copies each chunk into place: no list of chunks, no join,
so receiving an N-byte payload costs N bytes (plus one chunk in flight).
"""

from __future__ import annotations

from collections.abc import Iterator

from skyfed.errors import WireFormatError


def iter_chunks(payload: bytes | bytearray | memoryview, chunk_bytes: int) -> Iterator[bytes]:
    """Consecutive slices of at most `chunk_bytes` bytes (copied one at a time)."""
    if chunk_bytes <= 0:
        raise ValueError(f"chunk_bytes must be positive, got {chunk_bytes}")
    view = memoryview(payload)
    for start in range(0, len(view), chunk_bytes):
        yield bytes(view[start : start + chunk_bytes])


def iter_views(payload: bytes | bytearray | memoryview, chunk_bytes: int) -> Iterator[memoryview]:
    """Consecutive views of at most `chunk_bytes` bytes (no copies)."""
    if chunk_bytes <= 0:
        raise ValueError(f"chunk_bytes must be positive, got {chunk_bytes}")
    view = memoryview(payload)
    for start in range(0, len(view), chunk_bytes):
        yield view[start : start + chunk_bytes]


class Assembler:
    """Copies announced-size data into one preallocated buffer, checking the framing."""

    def __init__(self, size: int, what: str = "payload"):
        if size < 0:
            raise WireFormatError(f"{what}: negative announced size {size}")
        self.buffer = bytearray(size)
        self._view = memoryview(self.buffer)
        self.size = size
        self.pos = 0
        self.what = what

    def add(self, data: bytes | memoryview) -> None:
        end = self.pos + len(data)
        if end > self.size:
            raise WireFormatError(f"{self.what}: stream carries more than the announced {self.size} bytes")
        self._view[self.pos : end] = data
        self.pos = end

    def finish(self) -> bytearray:
        if self.pos != self.size:
            raise WireFormatError(f"{self.what}: stream ended after {self.pos} of the announced {self.size} bytes")
        self._view.release()
        return self.buffer
