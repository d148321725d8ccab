"""From a client's update (named tensors) to a ring vector, and from the ring sum back
to the weighted mean update.

Weights (token counts) are public metadata. A client pre-multiplies its clipped update
by its public relative weight w_i = n_i / n_max in (0, 1] (n_max: the largest token
count of the session, also public), so the ring sum is sum_i w_i x_i and the server
divides it by sum_i w_i over the survivors: the token-weighted mean. The other option
(weights kept private: send w_i as one extra ring coordinate, so the server learns
only the total) is described in docs/security.md and not implemented.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from skyfed.compression.wire import TensorSpec
from skyfed.errors import SecAggError
from skyfed.security.secagg.fixedpoint import ClipMode, FixedPoint, Rounding, clip
from skyfed.security.secagg.layout import RingLayout
from skyfed.security.secagg.session import SecAggParams


@dataclass(frozen=True)
class SecAggSettings:
    """The `security.secagg` section as the library sees it."""

    ring_bits: int = 32
    threshold: int | None = None
    neighbours: int | None = None
    clip: ClipMode = "coordinate"
    bound: float = 0.1
    rounding: Rounding = "deterministic"


class UpdateEncoder:
    """Clip, weight, fixed-point encode an update; decode a ring sum to a mean update."""

    def __init__(self, spec: dict[str, TensorSpec], settings: SecAggSettings, clients: int):
        self.layout = RingLayout(spec)
        self.settings = settings
        self.fixed = FixedPoint(settings.ring_bits, settings.bound, clients, settings.rounding)

    def params(self) -> SecAggParams:
        s = self.settings
        return SecAggParams(s.ring_bits, self.layout.size, s.threshold, s.neighbours, self.layout.fingerprint)

    def quantize(self, tensors: dict[str, torch.Tensor], weight: float = 1.0,
                 rng: np.random.Generator | None = None) -> np.ndarray:
        """The signed fixed-point integers (int64) of the clipped, weighted update."""
        if not 0 < weight <= 1:
            raise SecAggError(f"secure aggregation: a relative weight must be in (0, 1], got {weight}")
        flat = self.layout.flatten(tensors)
        clipped = clip(flat, self.settings.clip, self.settings.bound, list(self.layout.segments.values()))
        return self.fixed.quantize(clipped * weight, rng)

    def encode(self, tensors: dict[str, torch.Tensor], weight: float = 1.0,
               rng: np.random.Generator | None = None) -> np.ndarray:
        return self.fixed.to_ring(self.quantize(tensors, weight, rng))

    def decode_mean(self, ring_sum: np.ndarray, total_weight: float) -> dict[str, torch.Tensor]:
        if not total_weight > 0:
            raise SecAggError(f"secure aggregation: the total weight must be > 0, got {total_weight}")
        return self.layout.unflatten(self.fixed.decode(ring_sum) / total_weight)
