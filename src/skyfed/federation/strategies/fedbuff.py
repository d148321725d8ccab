"""FedBuff: buffer K asynchronous updates, then apply their staleness-weighted mean.

Nguyen et al. 2022, "Federated Learning with Buffered Asynchronous Aggregation",
AISTATS, arXiv:2106.06639.

Updates are held until `buffer_size` (K) have arrived; then

    x <- x - server_lr * sum_i n_i s(tau_i) delta_i / sum_i n_i

with n_i the client's tokens (or 1 with use_tokens=false) and s(tau) the staleness
weight (the paper's default 1/sqrt(1 + tau) is polynomial with a = 0.5). With K equal
to the number of clients, no staleness and server_lr = 1 this is exactly FedAvg.
Because s <= 1 is not renormalized away, stale updates really move the model less.
The buffer is part of `state_dict()`; `flush` applies a partial buffer at the end.

Security (docs/security.md): `max_staleness` drops updates more than that many versions
old; `max_client_share` caps each client's accepted share of the last `share_window`
arrivals (share_cap.py).

Under secure aggregation the buffer is one secure sum (`apply_secure`,
`loops/secure_buffer.py`): its K clients start from one model version, so their
staleness is common and its weight multiplies the unmasked mean.
"""

from __future__ import annotations

from typing import Any

from skyfed.federation.messages import Update
from skyfed.federation.strategies.aggregate import apply_delta, staleness_weight, weighted_sum
from skyfed.federation.strategies.base import AggregateResult, AsyncStrategy, Params
from skyfed.federation.strategies.fedasync import STALENESS_FNS
from skyfed.federation.strategies.params import choice, flag, integer, number
from skyfed.federation.strategies.share_cap import ShareCap


class FedBuff(AsyncStrategy):
    """Nguyen et al. 2022, "Federated Learning with Buffered Asynchronous Aggregation", arXiv:2106.06639."""

    name = "fedbuff"
    description = "asynchronous: buffer K updates, apply their staleness-weighted mean"
    paper = "Nguyen et al. 2022, arXiv:2106.06639"

    def __init__(
        self,
        buffer_size: int = 3,
        server_lr: float = 1.0,
        staleness: str = "polynomial",
        a: float = 0.5,
        b: int = 4,
        max_staleness: int | None = None,
        use_tokens: bool = True,
        max_client_share: float | None = None,
        share_window: int = 10,
    ):
        self.buffer_size = integer("buffer_size", buffer_size, 1)
        self.server_lr = number("server_lr", server_lr, 0.0, lo_open=True)
        self.staleness_fn = choice("staleness", staleness, STALENESS_FNS)
        self.a = number("a", a, 0.0)
        self.b = integer("b", b, 0)
        self.max_staleness = integer("max_staleness", max_staleness, 0, optional=True)
        self.use_tokens = flag("use_tokens", use_tokens)
        self.share = ShareCap(max_client_share, share_window)
        self.buffer: list[dict[str, Any]] = []  # {"client", "delta", "n", "staleness"}

    def on_update(self, global_params: Params, update: Update, base_params: Params | None) -> AggregateResult | None:
        if not self.share.admit(update.client):
            return None
        self.buffer.append({
            "client": update.client,
            "delta": {k: v.detach().clone() for k, v in update.delta.items()},
            "n": update.num_tokens if self.use_tokens else 1,
            "staleness": update.staleness,
        })
        return self._apply(global_params) if len(self.buffer) >= self.buffer_size else None

    def flush(self, global_params: Params) -> AggregateResult | None:
        return self._apply(global_params) if self.buffer else None

    def _apply(self, global_params: Params) -> AggregateResult:
        total = float(sum(e["n"] for e in self.buffer))
        scale = [e["n"] * staleness_weight(e["staleness"], self.staleness_fn, self.a, self.b) / total for e in self.buffer]
        step = weighted_sum([e["delta"] for e in self.buffer], scale)
        weights: dict[str, float] = {}
        for e, w in zip(self.buffer, scale):
            weights[e["client"]] = weights.get(e["client"], 0.0) + w
        metrics = {"weights": weights, "buffer_staleness": [e["staleness"] for e in self.buffer], **self.share.report()}
        self.buffer = []
        return AggregateResult(apply_delta(global_params, step, self.server_lr), metrics)

    def apply_secure(self, global_params: Params, mean: Update, staleness: int, tokens: dict[str, int]) -> AggregateResult:
        """A buffer whose token-weighted mean `mean.delta` came out of secure aggregation:
        every update in it has staleness `staleness` (its clients started from one model
        version), so FedBuff's sum_i n_i s(tau) delta_i / sum_i n_i is s(tau) x the mean.
        `tokens`: the survivors' public token counts (the weights the clients applied)."""
        w = staleness_weight(staleness, self.staleness_fn, self.a, self.b)
        total = float(sum(tokens.values()))
        weights = {c: w * n / total for c, n in tokens.items()}
        step = {k: v * w for k, v in mean.delta.items()}
        metrics = {"weights": weights, "buffer_staleness": [staleness] * len(tokens)}
        return AggregateResult(apply_delta(global_params, step, self.server_lr), metrics)

    def state_dict(self) -> dict[str, Any]:
        return {
            "buffer": [{**e, "delta": {k: v.clone() for k, v in e["delta"].items()}} for e in self.buffer],
            "share": self.share.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.buffer = [{**e, "delta": {k: v.clone() for k, v in e["delta"].items()}} for e in state.get("buffer", [])]
        self.share.load_state_dict(state.get("share", {}))
