"""FedAsync: every arriving update is mixed into the global model at once.

Xie et al. 2019, "Asynchronous Federated Optimization", arXiv:1903.03934.

With the client model x_new = x_base - delta (trained from the version it was sent,
`staleness` versions ago) and alpha_t = alpha * s(staleness):

    x <- (1 - alpha_t) x + alpha_t x_new                     (mix = "model", the paper)

or, without keeping old versions, the delta applied to the current model:

    x <- x - alpha_t delta                                   (mix = "delta")

The two agree when staleness = 0. s is constant, polynomial (tau + 1)^-a or hinge
(1 if tau <= b else 1 / (a (tau - b) + 1)). Every update publishes a new version.

Security (docs/security.md): `max_staleness` drops updates more than that many versions
old; `max_client_share` caps each client's accepted share of the last `share_window`
arrivals (share_cap.py).
"""

from __future__ import annotations

from typing import Any

from skyfed.federation.messages import Update
from skyfed.federation.strategies.aggregate import apply_delta, mix, staleness_weight
from skyfed.federation.strategies.base import AggregateResult, AsyncStrategy, Params
from skyfed.federation.strategies.params import choice, integer, number
from skyfed.federation.strategies.share_cap import ShareCap

STALENESS_FNS = ("constant", "polynomial", "hinge")


class FedAsync(AsyncStrategy):
    """Xie et al. 2019, "Asynchronous Federated Optimization", arXiv:1903.03934."""

    name = "fedasync"
    description = "asynchronous: mix each arriving model in with alpha * s(staleness)"
    paper = "Xie et al. 2019, arXiv:1903.03934"

    def __init__(
        self,
        alpha: float = 0.6,
        staleness: str = "polynomial",
        a: float = 0.5,
        b: int = 4,
        max_staleness: int | None = None,
        mix: str = "model",
        max_client_share: float | None = None,
        share_window: int = 10,
    ):
        self.alpha = number("alpha", alpha, 0.0, 1.0, lo_open=True)
        self.staleness_fn = choice("staleness", staleness, STALENESS_FNS)
        self.a = number("a", a, 0.0)
        self.b = integer("b", b, 0)
        self.max_staleness = integer("max_staleness", max_staleness, 0, optional=True)
        self.mix = choice("mix", mix, ["model", "delta"])
        self.needs_base_params = self.mix == "model"
        self.share = ShareCap(max_client_share, share_window)

    def on_update(self, global_params: Params, update: Update, base_params: Params | None) -> AggregateResult | None:
        if not self.share.admit(update.client):
            return None
        s = staleness_weight(update.staleness, self.staleness_fn, self.a, self.b)
        alpha_t = self.alpha * s
        if self.mix == "model":
            if base_params is None:
                raise ValueError("fedasync with mix='model' needs the update's base parameters")
            new = mix(global_params, apply_delta(base_params, update.delta), alpha_t)
        else:
            new = apply_delta(global_params, update.delta, alpha_t)
        return AggregateResult(new, {"alpha": {update.client: alpha_t}, **self.share.report()})

    def state_dict(self) -> dict[str, Any]:
        return {"share": self.share.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.share.load_state_dict(state.get("share", {}))
