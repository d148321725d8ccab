"""The checks of a plain fp32 update, run on its blob as the chunks pass.

The server core checks an update's tensors against the model (names, shapes, dtypes:
`wire.check_specs`) and every value (finite, at most `max_abs`: `wire.value_error`)
before any of it is folded. For a plain fp32 payload received in chunks, the same checks
can run on each chunk while it is still in cache, on the receiving side's helper
thread, instead of in a second pass over the whole update once it is in: `FrameReader`
feeds the blob's bytes to a `BlobCheck`, and the verdict travels with the payload
(`verdict`: "" all good, a message for the first problem, None when it could not
tell). It raises nothing: the core turns a problem into the update's rejection, as
its own pass would. Entries must lie in order without overlapping (as safetensors
writes them); otherwise the check gives up and the core checks in full.
"""

from __future__ import annotations

import warnings

import torch

from skyfed.compression.views import MAX_META_BYTES, blob_layout
from skyfed.compression.wire import MAX_ABS, TensorSpec, check_specs, value_error
from skyfed.errors import WireFormatError

F32 = 4  # bytes per value


class BlobCheck:
    """`check_specs` and `value_error` of a `blob_len`-byte plain fp32 blob, fed in order."""

    def __init__(self, expected: dict[str, TensorSpec], blob_len: int, what: str = "update",
                 max_abs: float | None = MAX_ABS):
        self.expected = expected
        self.blob_len = blob_len
        self.what = what
        self.max_abs = max_abs
        self.pos = 0
        self.problem: str | None = None
        self.gave_up = False
        self._head = bytearray()
        self._need = 8
        self._spans: list[tuple[int, int, str]] | None = None  # (begin, end, name) in blob bytes
        self._carry = bytearray()  # the first bytes of a value split between two chunks
        self._scratch = torch.empty(0, dtype=torch.uint8)

    @property
    def verdict(self) -> str | None:
        """"" when every value was checked and passed, the first problem, or None (unknown)."""
        if self.problem is not None:
            return self.problem
        if self.gave_up or self._spans is None or self.pos != self.blob_len:
            return None
        return ""

    def feed(self, data: bytes | memoryview) -> None:
        if self.problem is not None or self.gave_up:
            return
        view = memoryview(data).cast("B")
        try:
            if self._spans is None:
                view = self._take_head(view)
            if self._spans is not None and len(view):
                self._check(self.pos, view)
        except WireFormatError as exc:
            self.problem = str(exc)
        self.pos += len(data)

    def _take_head(self, view: memoryview) -> memoryview:
        """Buffer the safetensors header; once whole, check the entries and order them."""
        take = self._need - len(self._head)
        self._head += view[:take]
        view = view[take:]
        if len(self._head) < self._need:
            return view
        if self._need == 8:
            n = int.from_bytes(self._head[:8], "little")
            if n > MAX_META_BYTES or 8 + n > self.blob_len:
                self.gave_up = True  # the core's own check says what is wrong
                return view[:0]
            self._need += n
            return self._take_head(view)
        entries, data_start = blob_layout(self._head, self.blob_len)
        check_specs({n: TensorSpec(e.shape, e.dtype) for n, e in entries.items()}, self.expected, self.what)
        spans = sorted((data_start + e.begin, data_start + e.end, n) for n, e in entries.items() if e.end > e.begin)
        if any(b < prev_end for (_, prev_end, _), (b, _, _) in zip(spans, spans[1:])):
            self.gave_up = True
            return view[:0]
        self._spans, self._head = spans, bytearray()
        return view

    def _check(self, pos: int, view: memoryview) -> None:
        """Check the values of every entry that overlaps the bytes [pos, pos + len(view))."""
        end = pos + len(view)
        for begin, stop, name in self._spans:
            s, t = max(pos, begin), min(end, stop)
            if s >= t:
                continue
            part = view[s - pos : t - pos]
            lead = (-(s - begin)) % F32  # bytes that finish a value begun in the last chunk
            if lead:
                self._carry += part[:lead]
                part = part[lead:]
                if len(self._carry) == F32:
                    self._values(name, memoryview(bytes(self._carry)))
                    self._carry.clear()
            whole = len(part) // F32 * F32
            if whole:
                self._values(name, part[:whole])
            if whole < len(part):
                self._carry = bytearray(part[whole:])

    def _values(self, name: str, raw: memoryview) -> None:
        n = len(raw)
        with warnings.catch_warnings():  # read-only bytes: the tensor is only read
            warnings.filterwarnings("ignore", message="The given buffer is not writable")
            src = torch.frombuffer(raw, dtype=torch.uint8)
        if src.data_ptr() % F32 == 0:
            values = src.view(torch.float32)
        else:  # a value not on a 4-byte boundary in memory: read from an aligned copy
            if self._scratch.numel() < n:
                self._scratch = torch.empty(n, dtype=torch.uint8)
            values = self._scratch[:n].copy_(src).view(torch.float32)
        problem = value_error(values, self.max_abs)
        if problem is not None:
            raise WireFormatError(f"{self.what}: tensor {name!r} {problem}")
