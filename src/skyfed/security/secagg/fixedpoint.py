"""Clipping and the fixed-point code that turns a real update into ring elements.

An update (flattened, see `layout.py`) is clipped, multiplied by its client's public
weight w in (0, 1], and every coordinate is then bounded by `bound`:

- ``l2``: the whole vector is scaled to L2 norm <= bound (so is every coordinate);
- ``l2_per_tensor``: each tensor is scaled to L2 norm <= bound;
- ``coordinate``: every coordinate is clipped to [-bound, bound].

Encoding maps v to the integer q = round(v * scale) stored mod 2^bits. The scale is
chosen so that the sum of `clients` encoded values can never wrap around the ring:

    scale = ((2^(bits-1) - 1) / clients - 1) / bound

Each |q_i| <= bound * scale + 1 (rounding moves at most one step), so
|sum q_i| <= clients * (bound * scale + 1) = 2^(bits-1) - 1, which the signed reading
of the ring (`decode`) recovers exactly. Decoding the ring sum therefore gives the
exact sum of the fixed-point values: the secure sum equals the plain sum of the
quantized updates, bit for bit.

Rounding: ``deterministic`` is round-half-to-even (the same input always gives the
same integers, so runs are reproducible; error <= 0.5 / scale per coordinate, biased
towards zero for values under half a step); ``stochastic`` rounds up with probability
equal to the fractional part (unbiased, error < 1 / scale; reproducible only with a
seeded generator).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from skyfed.errors import SecAggError

ClipMode = Literal["l2", "l2_per_tensor", "coordinate"]
Rounding = Literal["deterministic", "stochastic"]


def clip(values: np.ndarray, mode: ClipMode, bound: float, segments: list[slice] | None = None) -> np.ndarray:
    """A clipped copy of `values` (float64); `segments` are the tensors for l2_per_tensor."""
    out = np.array(values, dtype=np.float64, copy=True)
    if mode == "coordinate":
        np.clip(out, -bound, bound, out=out)
    elif mode == "l2":
        norm = float(np.linalg.norm(out))
        if norm > bound:
            out *= bound / norm
    elif mode == "l2_per_tensor":
        for seg in segments or [slice(0, out.size)]:
            norm = float(np.linalg.norm(out[seg]))
            if norm > bound:
                out[seg] *= bound / norm
    else:
        raise SecAggError(f"secure aggregation: unknown clip mode {mode!r} (l2, l2_per_tensor, coordinate)")
    return out


@dataclass(frozen=True)
class FixedPoint:
    """Signed fixed point in Z_{2^bits}, sized so that `clients` values sum without wrapping."""

    bits: int
    bound: float
    clients: int
    rounding: Rounding = "deterministic"

    def __post_init__(self) -> None:
        if self.bits not in (16, 32):
            raise SecAggError(f"secure aggregation: ring bits must be 16 or 32, got {self.bits}")
        if not self.bound > 0:
            raise SecAggError(f"secure aggregation: the clip bound must be > 0, got {self.bound}")
        if not 1 <= self.clients < (2 ** (self.bits - 1) - 1) // 2:
            raise SecAggError(f"secure aggregation: {self.clients} clients do not fit a {self.bits}-bit ring")
        if self.rounding not in ("deterministic", "stochastic"):
            raise SecAggError(f"secure aggregation: rounding must be deterministic or stochastic, got {self.rounding!r}")

    @property
    def dtype(self) -> np.dtype:
        return np.dtype("<u2") if self.bits == 16 else np.dtype("<u4")

    @property
    def scale(self) -> float:
        return ((2 ** (self.bits - 1) - 1) / self.clients - 1) / self.bound

    @property
    def step(self) -> float:
        """The value of one integer step (the quantization resolution)."""
        return 1.0 / self.scale

    def quantize(self, values: np.ndarray, rng: np.random.Generator | None = None) -> np.ndarray:
        """Signed integers (int64) for `values`, which are first clipped to [-bound, bound]."""
        scaled = np.clip(np.asarray(values, dtype=np.float64), -self.bound, self.bound) * self.scale
        if self.rounding == "deterministic":
            return np.rint(scaled).astype(np.int64)
        if rng is None:
            raise SecAggError("secure aggregation: stochastic rounding needs a random generator")
        low = np.floor(scaled)
        return (low + (rng.random(scaled.shape) < (scaled - low))).astype(np.int64)

    def to_ring(self, q: np.ndarray) -> np.ndarray:
        return (np.asarray(q, dtype=np.int64) & (2**self.bits - 1)).astype(self.dtype)

    def encode(self, values: np.ndarray, rng: np.random.Generator | None = None) -> np.ndarray:
        return self.to_ring(self.quantize(values, rng))

    def signed(self, ring: np.ndarray) -> np.ndarray:
        """The signed integers a ring vector stands for (int64), e.g. a ring sum."""
        q = np.asarray(ring).astype(np.int64)
        return np.where(q >= 2 ** (self.bits - 1), q - 2**self.bits, q)

    def decode(self, ring: np.ndarray) -> np.ndarray:
        """Real values (float64) of a ring vector: one encoded value or a sum of them."""
        return self.signed(ring) / self.scale
