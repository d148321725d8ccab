"""Fold received updates into a running weighted sum without materializing them.

`tensor_views` reads a validated wire payload's safetensors blob in place
(`torch.frombuffer` over the receive buffer: zero copies), and `RunningSum` adds each
update into one fp32 accumulator as it arrives, so aggregating K updates of N bytes
holds the accumulator plus the buffer of the update being folded, not K x N bytes.
This is FedAvg's weighted mean of deltas (McMahan et al. 2017, arXiv:1602.05629) in
streaming form; it is exact for any strategy that is a weighted mean of updates.
It reads plain fp32 payloads (codec chain ``[]``) only.
"""

from __future__ import annotations

import json
import struct
import threading

import torch

from skyfed.compression.wire import TensorSpec, read_header
from skyfed.errors import WireFormatError
from skyfed.federation.messages import ClientResult
from skyfed.runtime.grpc.transport import GrpcTransport

_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}


def tensor_views(payload: bytearray | memoryview, expected: dict[str, TensorSpec], max_bytes: int | None = None) -> dict[str, torch.Tensor]:
    """Validated zero-copy tensors over `payload` (framing, CRC, names, shapes, dtypes, finiteness)."""
    header, blob = read_header(payload, max_bytes)
    if header.get("codecs"):
        raise WireFormatError(f"streaming fold reads plain payloads only, got codecs {header['codecs']!r}")
    start = len(memoryview(payload)) - len(blob)
    (n,) = struct.unpack_from("<Q", blob, 0)
    try:
        meta = json.loads(bytes(blob[8 : 8 + n]))
    except (ValueError, UnicodeDecodeError) as exc:
        raise WireFormatError(f"corrupt safetensors header: {exc}") from None
    base = start + 8 + n
    out: dict[str, torch.Tensor] = {}
    for name, info in meta.items():
        if name == "__metadata__":
            continue
        dtype = _DTYPES.get(info.get("dtype"))
        if dtype is None:
            raise WireFormatError(f"tensor {name!r}: unsupported dtype {info.get('dtype')!r}")
        begin, end = info["data_offsets"]
        count = (end - begin) // torch.empty((), dtype=dtype).element_size()
        t = torch.frombuffer(payload, dtype=dtype, count=count, offset=base + begin) if count else torch.empty(0, dtype=dtype)
        out[name] = t.view(info["shape"])
    _check(out, expected)
    return out


def _check(tensors: dict[str, torch.Tensor], expected: dict[str, TensorSpec], block: int = 2**22) -> None:
    """Names, shapes, dtypes, and finiteness checked in blocks (no update-sized temporaries)."""
    if set(tensors) != set(expected):
        raise WireFormatError(f"update does not match the model's parameters: {sorted(set(tensors) ^ set(expected))[:3]}")
    for name, spec in expected.items():
        t = tensors[name]
        if tuple(t.shape) != spec.shape or t.dtype != spec.dtype:
            raise WireFormatError(f"update: tensor {name!r} is {t.dtype}{tuple(t.shape)}, expected {spec.dtype}{spec.shape}")
        flat = t.reshape(-1)
        for start in range(0, flat.numel(), block):
            if not bool(torch.isfinite(flat[start : start + block]).all()):
                raise WireFormatError(f"update: tensor {name!r} contains NaN or Inf values")


class RunningSum:
    """sum_i w_i * delta_i, folded one update at a time into fp32 accumulators."""

    def __init__(self, spec: dict[str, TensorSpec]):
        self.acc = {n: torch.zeros(s.shape, dtype=torch.float32) for n, s in spec.items()}
        self.weight = 0.0
        self.count = 0

    def add(self, tensors: dict[str, torch.Tensor], weight: float) -> None:
        for name, acc in self.acc.items():
            acc.add_(tensors[name], alpha=weight)
        self.weight += weight
        self.count += 1

    def mean(self) -> dict[str, torch.Tensor]:
        """The weighted mean, in place (the accumulators become the result)."""
        if self.weight <= 0:
            raise ValueError("no weight folded in")
        for acc in self.acc.values():
            acc.div_(self.weight)
        return self.acc


class FoldingTransport(GrpcTransport):
    """A `GrpcTransport` that folds each accepted update into a `RunningSum` as it arrives
    (in the servicer thread, before the client's push is answered) and queues the result
    without its payload, so the receive buffer is freed at once. A bad payload is queued
    as a failed result instead. Folds are serialized by a lock."""

    def __init__(self, names: list[str], spec: dict[str, TensorSpec], max_bytes: int | None = None):
        super().__init__(names)
        self.spec = spec
        self.max_bytes = max_bytes
        self.running = RunningSum(spec)
        self._fold_lock = threading.Lock()

    def reset(self) -> RunningSum:
        """Start a new round's sum; return the finished one."""
        with self._fold_lock:
            done, self.running = self.running, RunningSum(self.spec)
            return done

    def submit(self, result: ClientResult) -> bool:
        with self._fold_lock:
            if self.check_open(result.client, result.round):
                return False
            if result.payload is not None:
                try:
                    self.running.add(tensor_views(result.payload, self.spec, self.max_bytes), float(result.num_tokens))
                except WireFormatError as exc:
                    result.error = f"refused by the server: {exc}"
                result.meta["bytes"] = len(result.payload)
                result.payload = None
            return super().submit(result)
