"""The malicious updates of the `attack:` section (simulation only), as pure functions.

Each maps the attacker's honest delta (and, for ALIE, the honest clients' deltas) to the
delta it sends instead; `skyfed.runtime.attack` applies them inside the simulation.
Deltas follow the engine's sign (theta_start - theta_end, subtracted by the server).

- sign_flip(k):  -k * delta (k = 1 undoes one honest update; k >= n - 1 cancels them all);
- scale(k):      k * delta;
- noise(k):      the update is replaced by Gaussian noise N(0, sigma^2) per coordinate with
                 sigma = k * ||delta|| / sqrt(d): relative to the update, its expected norm
                 is k times the honest update's norm;
- alie(z):       "A Little Is Enough" (Baruch, Baruch and Goldberg 2019, NeurIPS,
                 arXiv:1902.06156): mean - z * std per coordinate of the honest deltas, with
                 z_max from n and f as in the paper (`alie_z`); every attacker sends it;
- junk tokens:   the attacker's training shard replaced by uniformly random token ids.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from statistics import NormalDist

import numpy as np
import torch

Params = dict[str, torch.Tensor]


def sign_flip(delta: Params, k: float) -> Params:
    return {n: t.to(torch.float32) * -k for n, t in delta.items()}


def scale(delta: Params, k: float) -> Params:
    return {n: t.to(torch.float32) * k for n, t in delta.items()}


def noise(delta: Params, k: float, generator: torch.Generator) -> Params:
    """Gaussian noise with per-coordinate std k * ||delta|| / sqrt(d) (d: all coordinates)."""
    d = sum(t.numel() for t in delta.values())
    norm = math.sqrt(sum(float(t.to(torch.float64).pow(2).sum()) for t in delta.values()))
    sigma = k * norm / math.sqrt(max(1, d))
    # drawn in name order: a decoded payload's dict order is not guaranteed to repeat
    drawn = {n: torch.randn(delta[n].shape, generator=generator, dtype=torch.float32) * sigma for n in sorted(delta)}
    return {n: drawn[n] for n in delta}


def alie_z(n: int, f: int) -> float:
    """Baruch et al. 2019, Algorithm 1: s = floor(n/2 + 1) - f supporters needed, z_max =
    Phi^-1((n - s) / n). For n = 5, f = 1: s = 2, z = Phi^-1(0.6) = 0.2533."""
    s = math.floor(n / 2 + 1) - f
    p = min(max((n - s) / n, 1e-6), 1 - 1e-6)
    return NormalDist().inv_cdf(p)


def alie(honest: Sequence[Params], z: float) -> Params:
    """mean - z * std per coordinate of the honest deltas (population std)."""
    out: Params = {}
    for name in honest[0]:
        s = torch.stack([h[name].to(torch.float32) for h in honest])
        out[name] = s.mean(dim=0) - z * s.std(dim=0, correction=0)
    return out


def junk_tokens(length: int, vocab_size: int, seed: Sequence[int], dtype: np.dtype) -> np.ndarray:
    """`length` uniformly random token ids in [0, vocab_size), seeded."""
    return np.random.default_rng(list(seed)).integers(0, vocab_size, size=length).astype(dtype)
