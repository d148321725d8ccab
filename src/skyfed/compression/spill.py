"""A received payload kept in a temporary file instead of memory.

The server folds a large update into the round's running sum only once every byte of it
has been checked (framing, CRC-32, names, shapes, values): a refused update must leave
the sum exactly as it was, and floating-point additions cannot be taken back exactly.
So between its first chunk and that verdict the update has to be somewhere; the
`SpillWriter` writes each chunk to an anonymous temporary file as it arrives (memory
holds one chunk), and the `SpilledPayload` it finishes is read back in slabs
(`compression/slabs.py`). The file is unlinked from the start (`tempfile.TemporaryFile`):
it disappears when it is closed or the process ends, whatever happens.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any

from skyfed.errors import WireFormatError


class SpillWriter:
    """Writes a payload of announced `size` to a temporary file in `directory`, chunk by chunk."""

    def __init__(self, size: int, directory: str | os.PathLike | None = None, what: str = "payload"):
        self.size = size
        self.what = what
        self.pos = 0
        self.file = tempfile.TemporaryFile(dir=directory, prefix="skyfed-spill-")

    def add(self, data: bytes | memoryview) -> None:
        end = self.pos + len(data)
        if end > self.size:
            raise WireFormatError(f"{self.what}: stream carries more than the announced {self.size} bytes")
        view = memoryview(data)
        while len(view):
            written = os.write(self.file.fileno(), view)
            view = view[written:]
        self.pos = end

    def finish(self, header: dict[str, Any], blob_start: int, verdict: str | None = None) -> "SpilledPayload":
        if self.pos != self.size:
            raise WireFormatError(f"{self.what}: stream ended after {self.pos} of the announced {self.size} bytes")
        return SpilledPayload(self.file, self.size, header, blob_start, verdict)

    def close(self) -> None:
        self.file.close()


class SpilledPayload:
    """A complete payload in a temporary file, its framing and CRC-32 already checked:
    the checked `header`, where the blob starts, the values' check on arrival if any
    (`verdict`, see `streamcheck.BlobCheck`), and random reads. `len()` is its size on
    the wire."""

    def __init__(self, file, size: int, header: dict[str, Any], blob_start: int, verdict: str | None = None):
        self.file = file
        self.size = size
        self.header = header
        self.blob_start = blob_start
        self.verdict = verdict

    def __len__(self) -> int:
        return self.size

    def read_into(self, offset: int, out: memoryview) -> None:
        """Fill `out` with the payload's bytes from `offset` on."""
        out = memoryview(out).cast("B")
        pos = 0
        while pos < len(out):
            n = os.preadv(self.file.fileno(), [out[pos:]], offset + pos)
            if n <= 0:
                raise WireFormatError(f"spilled payload: read past its end at byte {offset + pos} of {self.size}")
            pos += n

    def read_all(self) -> bytearray:
        out = bytearray(self.size)
        self.read_into(0, memoryview(out))
        return out

    def close(self) -> None:
        self.file.close()
