"""Client-level DP-FedAvg, the client's half: clip the update, and (distributed noise) add
this client's share of the Gaussian noise.

McMahan, Ramage, Talwar, Zhang 2018, "Learning Differentially Private Recurrent Language
Models", ICLR, arXiv:1710.06963 (Algorithm 1, flat clipping; the fixed-denominator
estimator). Each client's update Delta is scaled to global L2 norm at most C:
Delta * min(1, C / ||Delta||). Noise N(0, sigma^2 C^2) goes on the SUM of the clipped
updates, added by the server (`noise: server`) or split among the n clients of a
cohort, each adding N(0, sigma^2 C^2 / n) (`noise: distributed`, for use with secure
aggregation: the server never sees a noise-free sum).

The noise comes from a generator seeded by the operating system (`secrets`), never from
the experiment seed: anyone who knows the config could otherwise subtract it.
"""

from __future__ import annotations

import logging
import math
import secrets
from dataclasses import dataclass, field

import torch

log = logging.getLogger(__name__)

Params = dict[str, torch.Tensor]


def global_norm(tensors: Params) -> float:
    """The L2 norm of all tensors taken as one vector (in float64)."""
    return math.sqrt(sum(float(torch.linalg.vector_norm(t.double())) ** 2 for t in tensors.values()))


def clip_update(update: Params, clip: float) -> tuple[Params, float]:
    """(update scaled to global L2 norm <= clip, its norm before clipping); new tensors."""
    norm = global_norm(update)
    scale = min(1.0, clip / norm) if norm > 0 else 1.0
    return {n: t.to(torch.float32) * scale for n, t in update.items()}, norm


def secret_generator() -> torch.Generator:
    """A CPU torch generator seeded from the operating system's CSPRNG."""
    gen = torch.Generator()
    gen.manual_seed(secrets.randbits(63))
    return gen


def add_gaussian_noise(tensors: Params, std: float, generator: torch.Generator) -> None:
    """Add N(0, std^2) to every coordinate, in place."""
    for t in tensors.values():
        t.add_(torch.randn(t.shape, generator=generator, dtype=torch.float32), alpha=std)


def cohort_size(num_clients: int, fraction: float, min_clients: int) -> int:
    """The number of clients a round selects (public): max(min_clients, ceil(fraction * n)),
    at most n, as `skyfed.federation.engine.select_clients` draws them."""
    return min(num_clients, max(min_clients, math.ceil(fraction * num_clients)))


@dataclass
class ClientDP:
    """What a client does to its update before encoding it (client-level DP)."""

    clip: float
    noise_std: float = 0.0  # distributed noise: sigma * C / sqrt(cohort); 0 with server noise
    generator: torch.Generator = field(default_factory=secret_generator)

    def privatize(self, update: Params) -> Params:
        """The clipped update, plus this client's noise share. Its norm before clipping
        stays on the client (logged at debug level): it is a statistic of the data."""
        clipped, norm = clip_update(update, self.clip)
        log.debug("update norm %.4g, clip %.4g", norm, self.clip)
        if self.noise_std > 0:
            add_gaussian_noise(clipped, self.noise_std, self.generator)
        return clipped
