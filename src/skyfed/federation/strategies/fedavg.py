"""FedAvg: the token-weighted mean of client models.

McMahan et al. 2017, "Communication-Efficient Learning of Deep Networks from
Decentralized Data", AISTATS. https://arxiv.org/abs/1602.05629

With deltas theta_start - theta_end this is theta - sum_i (n_i / n) * delta_i, which
equals the weighted mean of the client models sum_i (n_i / n) * theta_i. The mean is
folded one update at a time (`mean.py`), so the server never holds a round's updates.
"""

from __future__ import annotations

from skyfed.federation.messages import Update
from skyfed.federation.strategies.aggregate import apply_delta
from skyfed.federation.strategies.base import AggregateResult, Params
from skyfed.federation.strategies.mean import MeanStrategy


class FedAvg(MeanStrategy):
    """McMahan et al. 2017, "Communication-Efficient Learning of Deep Networks from
    Decentralized Data", AISTATS, arXiv:1602.05629."""

    name = "fedavg"
    description = "token-weighted average of client models"
    paper = "McMahan et al. 2017, arXiv:1602.05629"

    def weight(self, update: Update) -> float:
        return float(update.num_tokens)

    def step(self, global_params: Params, mean_delta: Params, weights: dict[str, float], round: int) -> AggregateResult:
        # the mean is the running sum's own memory: the new model is written over it
        return AggregateResult(apply_delta(global_params, mean_delta, in_place=True), {"weights": weights})
