"""Split wire bytes into stream chunks and reassemble them into one preallocated buffer.

The receiver learns the total size from the stream's header, allocates one bytearray
of exactly that size and copies each chunk into place: no list of chunks, no join,
so receiving an N-byte payload costs N bytes (plus one chunk in flight). A server that
spills large updates to disk uses `compression.spill.SpillWriter` instead (the same
`add` / `finish` / `close`).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from typing import Any

from skyfed.compression.wire import Framed
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
    """Copies announced-size data into one preallocated buffer, checking the sizes."""

    def __init__(self, size: int, what: str = "payload"):
        if size < 0:
            raise WireFormatError(f"{what}: negative announced size {size}")
        self.buffer = Framed(size)
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

    def finish(self, header: dict[str, Any] | None = None, blob_start: int = 0, verdict: str | None = None) -> Framed:
        """The bytes; with the `header` a `FrameReader` checked on the way, marked as checked."""
        if self.pos != self.size:
            raise WireFormatError(f"{self.what}: stream ended after {self.pos} of the announced {self.size} bytes")
        self._view.release()
        return self.buffer.checked(header, blob_start, verdict) if header is not None else self.buffer

    def close(self) -> None:
        self._view.release()


class Pipeline:
    """Hands each received chunk to `consume` on a helper thread, at most `depth` chunks
    behind, so the gRPC thread takes the next message while the last one is checked and
    stored (`zlib.crc32` and `os.write` release the GIL: the two overlap on two cores).
    The first error `consume` raises comes back from the next `put` or from `finish`."""

    def __init__(self, consume: Callable[[memoryview], None], depth: int = 2):
        self.consume = consume
        self.error: BaseException | None = None
        self._queue: queue.Queue = queue.Queue(depth)
        self._thread = threading.Thread(target=self._run, name="skyfed-chunks", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (chunk := self._queue.get()) is not None:
            if self.error is None:  # after an error, drain without consuming
                try:
                    self.consume(chunk)
                except BaseException as exc:  # handed to the receiving thread
                    self.error = exc
            del chunk

    def put(self, chunk: memoryview) -> None:
        if self.error is not None:
            raise self.error
        self._queue.put(chunk)

    def finish(self) -> None:
        """Wait until every chunk is consumed; raise the first error."""
        self._queue.put(None)
        self._thread.join()
        if self.error is not None:
            raise self.error

    def abort(self) -> None:
        self.error = self.error or RuntimeError("aborted")
        self._queue.put(None)
        self._thread.join()
