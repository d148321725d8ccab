"""FedAvg: the token-weighted mean of client models.

McMahan et al. 2017, "Communication-Efficient Learning of Deep Networks from
Decentralized Data", AISTATS. https://arxiv.org/abs/1602.05629

With deltas theta_start - theta_end this is theta - sum_i (n_i / n) * delta_i, which
equals the weighted mean of the client models sum_i (n_i / n) * theta_i.
"""

from __future__ import annotations

from skyfed.federation.messages import Update
from skyfed.federation.strategies.aggregate import apply_delta, weighted_mean
from skyfed.federation.strategies.base import AggregateResult, Params, Strategy


class FedAvg(Strategy):
    """McMahan et al. 2017, "Communication-Efficient Learning of Deep Networks from
    Decentralized Data", AISTATS, arXiv:1602.05629."""

    name = "fedavg"
    description = "token-weighted average of client models"
    paper = "McMahan et al. 2017, arXiv:1602.05629"

    def aggregate(self, global_params: Params, updates: list[Update], round: int) -> AggregateResult:
        weights = [u.num_tokens for u in updates]
        mean_delta = weighted_mean([u.delta for u in updates], weights)
        total = sum(weights)
        return AggregateResult(
            apply_delta(global_params, mean_delta),
            {"weights": {u.client: u.num_tokens / total for u in updates}},
        )
