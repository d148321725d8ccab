"""A fixed, ordered name -> shape spec that flattens an update into one vector and back.

Every client and the server build the layout from the same spec (the model's trainable
tensors, `compression.wire.TensorSpec`), so coordinate i means the same thing
everywhere; the fingerprint in the roster makes a mismatch an error, not garbage.
"""

from __future__ import annotations

import hashlib
import json
import math

import numpy as np
import torch

from skyfed.compression.wire import TensorSpec
from skyfed.errors import SecAggError


class RingLayout:
    def __init__(self, spec: dict[str, TensorSpec]):
        self.spec = dict(spec)
        self.segments: dict[str, slice] = {}
        offset = 0
        for name, s in self.spec.items():
            size = math.prod(s.shape)
            self.segments[name] = slice(offset, offset + size)
            offset += size
        self.size = offset

    @property
    def fingerprint(self) -> str:
        """Hex SHA-256 of the ordered names and shapes."""
        text = json.dumps([[name, list(s.shape)] for name, s in self.spec.items()])
        return hashlib.sha256(text.encode()).hexdigest()

    def flatten(self, tensors: dict[str, torch.Tensor]) -> np.ndarray:
        if set(tensors) != set(self.spec):
            missing = sorted(set(self.spec) - set(tensors))[:3]
            extra = sorted(set(tensors) - set(self.spec))[:3]
            raise SecAggError(f"secure aggregation: update does not match the layout (missing {missing}, unexpected {extra})")
        out = np.empty(self.size, dtype=np.float64)
        for name, seg in self.segments.items():
            t = tensors[name]
            if tuple(t.shape) != self.spec[name].shape:
                raise SecAggError(f"secure aggregation: tensor {name!r} has shape {tuple(t.shape)}, expected {self.spec[name].shape}")
            out[seg] = t.detach().reshape(-1).to(torch.float64).cpu().numpy()
        return out

    def unflatten(self, vector: np.ndarray) -> dict[str, torch.Tensor]:
        if vector.shape != (self.size,):
            raise SecAggError(f"secure aggregation: vector of shape {vector.shape}, expected ({self.size},)")
        return {
            name: torch.from_numpy(np.ascontiguousarray(vector[seg])).reshape(self.spec[name].shape).to(self.spec[name].dtype)
            for name, seg in self.segments.items()
        }
