"""FedAvg: the token-weighted mean of client models.

McMahan et al. 2017, "Communication-Efficient Learning of Deep Networks from
Decentralized Data", AISTATS. https://arxiv.org/abs/1602.05629

With deltas theta_start - theta_end this is theta - sum_i (n_i / n) * delta_i, which
equals the weighted mean of the client models sum_i (n_i / n) * theta_i. The mean is
folded one update at a time (`mean.py`), so the server never holds a round's updates.

`exclude` lists clients whose updates get weight 0 (they still train and send): the
oracle of a degraded-data experiment, FedAvg of the clean clouds on the very shards
they have with the degraded ones present (configs/frontier/degraded-oracle.yaml).
"""

from __future__ import annotations

from skyfed.federation.messages import Update
from skyfed.federation.strategies.aggregate import apply_delta
from skyfed.federation.strategies.base import AggregateResult, Params
from skyfed.federation.strategies.mean import MeanStrategy
from skyfed.federation.strategies.params import bad


class FedAvg(MeanStrategy):
    """McMahan et al. 2017, "Communication-Efficient Learning of Deep Networks from
    Decentralized Data", AISTATS, arXiv:1602.05629."""

    name = "fedavg"
    description = "token-weighted average of client models"
    paper = "McMahan et al. 2017, arXiv:1602.05629"

    def __init__(self, exclude: list[str] | None = None):
        if exclude is not None and (not isinstance(exclude, list) or not all(isinstance(c, str) for c in exclude)):
            raise bad("exclude", f"expected a list of client names, got {exclude!r}")
        self.exclude = frozenset(exclude or [])

    def weight(self, update: Update) -> float:
        return 0.0 if update.client in self.exclude else float(update.num_tokens)

    def step(self, global_params: Params, mean_delta: Params, weights: dict[str, float], round: int) -> AggregateResult:
        # the mean is the running sum's own memory: the new model is written over it
        return AggregateResult(apply_delta(global_params, mean_delta, in_place=True), {"weights": weights})
