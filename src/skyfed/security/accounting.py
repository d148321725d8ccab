"""Privacy accounting with Google's `dp-accounting` library: never a hand-typed formula.

Each private release is a `DpEvent`: a Gaussian mechanism with noise multiplier sigma
(noise std / L2 sensitivity), Poisson-subsampled at rate q when q < 1, composed over
the steps taken. The accountant is the Renyi-DP accountant (Mironov 2017, "Renyi
Differential Privacy", CSF; subsampled Gaussian of Mironov, Talwar, Zhang 2019,
arXiv:1908.10530) or the privacy-loss-distribution accountant (Meiser and Mohammadi
2018; Koskela et al. 2020), both under add-or-remove-one neighbouring datasets.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable
from typing import Any

PLD_DISCRETIZATION = 1e-4  # value_discretization_interval of the PLD accountant


def sampled_gaussian(sample_rate: float, noise_multiplier: float) -> Any:
    """One step (a dp_accounting.DpEvent): the Gaussian mechanism, Poisson-subsampled
    when sample_rate < 1."""
    import dp_accounting

    if not 0 < sample_rate <= 1:
        raise ValueError(f"sample rate must be in (0, 1], got {sample_rate}")
    event = dp_accounting.GaussianDpEvent(noise_multiplier)
    return event if sample_rate >= 1 else dp_accounting.PoissonSampledDpEvent(sample_rate, event)


def composed(steps: Iterable[tuple[float, float, int]]) -> Any:
    """The composition (a dp_accounting.DpEvent) of (sample_rate, noise_multiplier, count) runs of steps."""
    import dp_accounting

    parts = [dp_accounting.SelfComposedDpEvent(sampled_gaussian(q, s), n) for q, s, n in steps if n > 0]
    return dp_accounting.ComposedDpEvent(parts)


def make_accountant(kind: str = "rdp") -> Any:
    """A fresh dp_accounting.PrivacyAccountant (imported here: the privacy extra is optional)."""
    from dp_accounting.pld import pld_privacy_accountant
    from dp_accounting.rdp import rdp_privacy_accountant

    if kind == "rdp":
        return rdp_privacy_accountant.RdpAccountant()
    if kind == "pld":
        return pld_privacy_accountant.PLDAccountant(value_discretization_interval=PLD_DISCRETIZATION)
    raise ValueError(f"unknown accountant {kind!r} (rdp or pld)")


def epsilon(steps: Iterable[tuple[float, float, int]], delta: float, kind: str = "rdp") -> float:
    """Epsilon at `delta` after the given runs of (sample_rate, noise_multiplier, count) steps;
    0.0 before any step."""
    runs = [r for r in steps if r[2] > 0]
    if not runs:
        return 0.0
    accountant = make_accountant(kind)
    accountant.compose(composed(runs))
    eps = float(accountant.get_epsilon(delta))
    return eps if math.isfinite(eps) else float("inf")


def dpsgd_epsilon(sample_rate: float, noise_multiplier: float, steps: int, delta: float, kind: str = "rdp") -> float:
    """Epsilon of `steps` DP-SGD steps at one sampling rate and noise multiplier."""
    return epsilon([(sample_rate, noise_multiplier, steps)], delta, kind)


class StepLedger:
    """Counts released steps by (sample_rate, noise_multiplier), for `epsilon`."""

    def __init__(self, runs: Iterable[tuple[float, float, int]] = ()):
        self.counts: Counter[tuple[float, float]] = Counter()
        for q, s, n in runs:
            self.counts[(float(q), float(s))] += int(n)

    def add(self, sample_rate: float, noise_multiplier: float, count: int = 1) -> None:
        self.counts[(float(sample_rate), float(noise_multiplier))] += count

    def runs(self) -> list[tuple[float, float, int]]:
        return [(q, s, n) for (q, s), n in sorted(self.counts.items())]

    @property
    def steps(self) -> int:
        return sum(self.counts.values())
