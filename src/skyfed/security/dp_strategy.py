"""Client-level DP-FedAvg, the server's half: a wrapper around a weighted-mean strategy.

McMahan et al. 2018, "Learning Differentially Private Recurrent Language Models", ICLR,
arXiv:1710.06963. The server sums the clipped updates with EQUAL weights (a weight that
depends on a client's data, such as its token count, makes the sensitivity of the sum
unbounded), adds N(0, sigma^2 C^2) to the sum when the noise is the server's, and
divides by the cohort size n fixed in advance (the paper's fixed-denominator estimator:
a denominator that counted the arrivals would depend on who took part). The wrapped
strategy then steps on that mean as usual: FedAvg applies it, FedOpt's server optimizer
steps on it (post-processing, so any server optimizer keeps the guarantee).

With server noise the server also clips every decoded update to C again, so a client
that skipped clipping, or a lossy codec with error feedback that grew the update,
cannot raise the sensitivity. With distributed noise each update already carries noise
and the server must not clip it (and, under secure aggregation, cannot see it).
"""

from __future__ import annotations

import torch

from skyfed.federation.messages import Update
from skyfed.federation.strategies.base import AggregateResult, Params
from skyfed.federation.strategies.mean import MeanStrategy, RunningMean
from skyfed.security.dp import add_gaussian_noise, clip_update, secret_generator


class DPMean(MeanStrategy):
    """A MeanStrategy (FedAvg, FedProx, the FedOpt family) under client-level DP."""

    def __init__(
        self,
        inner: MeanStrategy,
        clip: float,
        noise_multiplier: float,
        cohort: int,
        noise: str = "server",
        generator: torch.Generator | None = None,
    ):
        self.inner = inner
        self.name = inner.name
        self.description = inner.description
        self.paper = inner.paper
        self.clip = float(clip)
        self.noise_multiplier = float(noise_multiplier)
        self.cohort = int(cohort)
        self.noise = noise
        self.generator = generator or secret_generator()

    def client_options(self, round: int) -> dict:
        return self.inner.client_options(round)

    def weight(self, update: Update) -> float:
        return 1.0

    def fold(self, running: RunningMean, update: Update) -> None:
        if self.noise == "server":
            clipped, _ = clip_update(update.delta, self.clip)
            update = Update(update.client, update.round, update.base_version, clipped, update.num_tokens, update.train_loss)
        running.add(update, 1.0)

    def noisy_mean(self, running: RunningMean) -> Params:
        """(sum of clipped updates [+ N(0, sigma^2 C^2)]) / cohort, in place in `running`."""
        if self.noise == "server":
            add_gaussian_noise(running.acc, self.noise_multiplier * self.clip, self.generator)
        for acc in running.acc.values():
            acc.div_(self.cohort)
        return running.acc

    def finish(self, global_params: Params, running: RunningMean, round: int) -> AggregateResult:
        arrived = len(running.weights)
        mean = self.noisy_mean(running)
        result = self.step(global_params, mean, {c: 1.0 / self.cohort for c, _ in running.weights}, round)
        result.metrics["dp_updates"] = arrived
        return result

    def step(self, global_params: Params, mean_delta: Params, weights: dict[str, float], round: int) -> AggregateResult:
        return self.inner.step(global_params, mean_delta, weights, round)

    def state_dict(self) -> dict:
        return self.inner.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.inner.load_state_dict(state)
