"""An update validated whole and then decoded slab by slab (about 2^20 values).

For a plain fp32 payload, or one whose chain is a single codec whose values decode run
by run (fp32, fp16, bf16, int8, int4: `Codec.slab_parts`), `SlabDelta` reads the
payload's safetensors layout (from its spill file, `compression/spill.py`, or from the
bytes in memory), checks the entries against the model
(the names, dtypes and shapes `check_tensors` and `Chain.decode` require) and then
reads every slab once and runs the same codec checks, decoding and value bounds on it
that a whole-tensor decode runs. Only then is it an update: `fold_into` reads it a
second time and adds each decoded slab into the running sum, so the server's memory
holds a slab, never the decoded update, nor (spilled) the encoded one (FLARE's tensor
streaming; here at the granularity of slabs). A slab starts at a multiple of the codec's block, so it decodes exactly as in
the whole tensor. As a `Mapping` it also hands out whole decoded tensors, one at a
time, to any consumer that needs them (norm bounding).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator, Mapping

import torch

from skyfed.compression.chain import SEP, Chain
from skyfed.compression.spill import SpilledPayload
from skyfed.compression.views import Entry, blob_layout, layout_head_bytes
from skyfed.compression.wire import MAX_ABS, TensorSpec, check_specs, value_error
from skyfed.errors import WireFormatError
from skyfed.heap import release_free_memory

SLAB_VALUES = 1 << 20


def sliceable(header: dict) -> bool:
    """Whether a checked payload header's codec chain decodes slab by slab."""
    try:
        codecs = Chain.from_specs(header.get("codecs", [])).codecs
    except WireFormatError:
        return False  # the whole-payload decode refuses it with its own message
    return len(codecs) == 0 or (len(codecs) == 1 and codecs[0].slab_parts(1) is not None)


class SlabDelta(Mapping):
    """The validated update in a payload (a `SpilledPayload`, or bytes in memory whose
    framing and CRC were checked: `header`, `blob_start`): tensors decoded slab by slab."""

    def __init__(self, payload: SpilledPayload | bytes | bytearray, header: dict, blob_start: int,
                 expected: dict[str, TensorSpec], what: str = "update", max_abs: float | None = MAX_ABS,
                 values_checked: bool = False):
        """`values_checked`: a plain payload whose values were checked as it arrived
        (`streamcheck.BlobCheck`): only its layout is checked here."""
        self.payload = payload
        self.header = header
        self.blob_start = blob_start
        self.size = len(payload)
        self.expected = expected
        self.what = what
        self.max_abs = max_abs
        if not sliceable(header):
            raise ValueError(f"codec chain {header.get('codecs')} does not decode slab by slab")
        self.chain = Chain.from_specs(header.get("codecs", []))
        self._buffers: dict[str, torch.Tensor] = {}
        self.parts = self._layout()
        if not (values_checked and not self.chain):
            for key in expected:  # every value checked before any is used
                for _ in self._slabs(key, check=True):
                    pass

    # ------------------------------------------------------------ layout

    def _read(self, offset: int, nbytes: int, slot: str) -> torch.Tensor:
        """`nbytes` of the payload from `offset` (uint8): a view of bytes in memory, or
        read from the spill file into a reused buffer."""
        if not isinstance(self.payload, SpilledPayload):
            if nbytes == 0:
                return torch.empty(0, dtype=torch.uint8)
            with warnings.catch_warnings():  # read-only bytes: the views are only read
                warnings.filterwarnings("ignore", message="The given buffer is not writable")
                return torch.frombuffer(self.payload, dtype=torch.uint8, count=nbytes, offset=offset)
        buf = self._buffers.get(slot)
        if buf is None or buf.numel() < nbytes:
            buf = self._buffers[slot] = torch.empty(max(nbytes, 8), dtype=torch.uint8)
        out = buf[:nbytes]
        self.payload.read_into(offset, memoryview(out.numpy()))
        return out

    def _layout(self) -> dict[str, dict[str, tuple[Entry, int]]]:
        """{tensor: {part: (its entry, values per element)}}, checked against the model."""
        blob_len = self.size - self.blob_start
        if blob_len < 8:
            raise WireFormatError("corrupt tensor data: blob shorter than its 8-byte header length")
        need = min(blob_len, layout_head_bytes(self._read(self.blob_start, 8, "head").numpy().tobytes()))
        entries, data_start = blob_layout(self._read(self.blob_start, need, "head").numpy(), blob_len)
        self._buffers.pop("head", None)
        self.data_offset = self.blob_start + data_start
        if not self.chain:
            check_specs({n: TensorSpec(e.shape, e.dtype) for n, e in entries.items()}, self.expected, self.what)
            return {key: {"": (entries[key], 1)} for key in self.expected}
        plan: dict[str, dict[str, tuple[Entry, int]]] = {}
        for key, spec in self.expected.items():
            codec = self.chain.for_shape(spec.shape)[0]
            n = math.prod(spec.shape)
            where = f"{self.what}: tensor {key!r} ({codec.name})"
            plan[key] = {}
            for part, (dtype, count, per) in codec.slab_parts(n).items():
                e = entries.pop(f"{key}{SEP}0.{part}", None)
                if e is None:
                    raise WireFormatError(f"{where}: missing encoded part {part!r}")
                if e.dtype != dtype or e.shape != (count,):
                    raise WireFormatError(
                        f"{where}: encoded part {part!r} is {str(e.dtype).removeprefix('torch.')} {e.shape}, "
                        f"expected {str(dtype).removeprefix('torch.')} {(count,)}"
                    )
                plan[key][part] = (e, per)
        if entries:
            raise WireFormatError(f"{self.what}: unexpected encoded tensor {next(iter(entries))[:120]!r}")
        return plan

    # ------------------------------------------------------------ slabs

    def _slabs(self, key: str, check: bool = False) -> Iterator[tuple[int, int, torch.Tensor]]:
        """(first value, end, decoded float32 values) of each slab of tensor `key`; with
        `check`, the values are checked against the bound (the codecs' own checks always run)."""
        n = math.prod(self.expected[key].shape)
        align = self.chain.codecs[0].slab_align if self.chain else 1
        step = max(align, SLAB_VALUES // align * align)
        for lo in range(0, n, step):
            hi = min(n, lo + step)
            parts = {}
            for part, (e, per) in self.parts[key].items():
                size = e.dtype.itemsize
                first, last = lo // per, math.ceil(hi / per)
                raw = self._read(self.data_offset + e.begin + first * size, (last - first) * size, part)
                parts[part] = raw.view(e.dtype)
            if self.chain:
                stage = {f"{key}{SEP}0.{p}": t for p, t in parts.items()}
                slab = self.chain.decode(stage, {key: TensorSpec((hi - lo,), torch.float32)}, self.what)[key]
            else:
                slab = parts[""]
            problem = value_error(slab, self.max_abs) if check else None
            if problem is not None:
                raise WireFormatError(f"{self.what}: tensor {key!r} {problem}")
            yield lo, hi, slab

    # ------------------------------------------------------------ use

    def fold_into(self, acc: dict[str, torch.Tensor], weight: float, assign: bool = False) -> None:
        """acc[name] += weight * delta[name] (`assign`: acc[name] = weight * delta[name]), slab by slab."""
        for key in self.expected:
            flat = acc[key].view(-1)
            for lo, hi, slab in self._slabs(key):
                if assign:
                    torch.mul(slab, weight, out=flat[lo:hi])
                else:
                    flat[lo:hi].add_(slab, alpha=weight)

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self.expected:
            raise KeyError(key)
        out = torch.empty(self.expected[key].shape, dtype=torch.float32)
        flat = out.view(-1)
        for lo, hi, slab in self._slabs(key):
            flat[lo:hi].copy_(slab)
        return out

    def __iter__(self) -> Iterator[str]:
        return iter(self.expected)

    def __len__(self) -> int:
        return len(self.expected)

    def close(self) -> None:
        """Drop the buffers and the spill file, and give the freed memory back."""
        self._buffers.clear()
        if isinstance(self.payload, SpilledPayload):
            self.payload.close()
        self.payload = b""
        release_free_memory()
