"""FedProx: FedAvg aggregation, with a proximal term in every client's local objective.

Li et al. 2020, "Federated Optimization in Heterogeneous Networks", MLSys.
https://arxiv.org/abs/1812.06127

Each client minimises  f_k(theta) + mu/2 ||theta - theta_global||^2  (implemented in
`skyfed.train.LocalTrainer.train`, which anchors at the model it received), which
limits client drift on heterogeneous data. The server side is plain FedAvg.
"""

from __future__ import annotations

from typing import Any

from skyfed.federation.strategies.fedavg import FedAvg
from skyfed.federation.strategies.params import number


class FedProx(FedAvg):
    """Li et al. 2020, "Federated Optimization in Heterogeneous Networks", MLSys, arXiv:1812.06127."""

    name = "fedprox"
    description = "FedAvg + proximal term mu/2 ||theta - theta_global||^2 in local training"
    paper = "Li et al. 2020, arXiv:1812.06127"

    def __init__(self, mu: float = 0.01):
        super().__init__()
        self.mu = number("mu", mu, 0.0)

    def client_options(self, round: int) -> dict[str, Any]:
        return {"prox_mu": self.mu}
