"""Dynamic weighted aggregation: clients whose local models perform better pull harder.

Each round every client's model theta_i = theta - delta_i is scored by a loss, the loss
is mapped to a weight, optionally multiplied by the client's token count, floored so
that no cloud is silenced, and the global model becomes the weighted mean of the
client models. The weights of every round go to metrics.jsonl.

This is the performance-weighted aggregation of the skyfed paper's first mechanism.
Here:

- score "holdout": the client's loss on a fixed held-out slice of its own tokens (the
  last `holdout_tokens` of its shard, excluded from its training), measured after its
  local training and returned in `ClientResult.holdout_loss`;
- score "server": the server's loss of each client model on a small validation set it
  holds (`server_tokens` long), through the `evaluate_params(params) -> loss` callable
  the runtime gives at construction;
- mapping "softmax": w_i ∝ exp(-loss_i / temperature); "inverse": w_i ∝ loss_i^-power;
  "robust": w_i ∝ 1 up to median + max(k * MAD, min_margin) of the round's losses, then a
  Gaussian tail (`aggregate.robust_weights`);
- use_tokens: w_i ∝ n_i * mapping(loss_i);
- floor: every share is at least min(floor, 1/n) (the rest renormalized); default 0.05
  for softmax and inverse, 0 for robust.

With equal losses it is exactly token-weighted FedAvg.

Why "robust" (issue 17): softmax at temperature 0.1 turns a 0.14-nat gap between two
equal IID clouds into weights 0.18 / 0.77, because the temperature is an absolute loss
scale while loss gaps depend on the model, the data and the round; and its 5% floor
still lets a junk cloud in. The robust mapping measures a loss against the round's own
spread (median and median absolute deviation, the Hampel identifier: Hampel 1974,
"The influence curve and its role in robust estimation", JASA; as `loss_filter` does
for defence), so clients within their usual spread get token weights and only an
outlying loss loses weight, smoothly. With fewer than three clients, or half of them
degraded, the median cannot tell good from bad and it falls back to token weights.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Callable

from skyfed.errors import ConfigError
from skyfed.federation.messages import Update
from skyfed.federation.strategies.aggregate import (
    apply_delta,
    apply_floor,
    inverse_weights,
    normalize,
    robust_weights,
    softmax_weights,
    weighted_mean,
)
from skyfed.federation.strategies.base import AggregateResult, Params, Strategy
from skyfed.federation.strategies.params import PREFIX, choice, flag, integer, number

log = logging.getLogger(__name__)

ParamsEvaluator = Callable[[Params], float]


class DynamicWeighted(Strategy):
    """Dynamic (performance-) weighted aggregation, the skyfed paper's first mechanism.

    Weighting clients by a power of their loss also appears in q-FFL (Li et al. 2020,
    "Fair Resource Allocation in Federated Learning", ICLR, arXiv:1905.10497), but there
    in the opposite direction (higher loss, more weight, for fairness); here lower loss
    pulls harder, for accuracy, and the floor keeps every cloud heard.
    """

    name = "dynamic"
    description = "performance-weighted average: lower held-out (or server) loss, larger weight"
    paper = "skyfed paper, mechanism 1 (cf. loss-power weights of q-FFL, Li et al. 2020, arXiv:1905.10497)"

    def __init__(
        self,
        score: str = "holdout",
        mapping: str = "softmax",
        temperature: float = 0.1,
        power: float = 1.0,
        use_tokens: bool = True,
        floor: float | None = None,  # None: 0.05, or 0 for mapping robust
        k: float = 2.0,  # robust: full weight up to median + k MADs
        # robust: ... or median + min_margin (nats), if larger. 0.05: clean IID clouds' losses
        # spread up to 0.054 nats in a round of bench/results/degraded_tiny_8x20.json
        min_margin: float = 0.05,
        holdout_tokens: int = 2048,
        server_tokens: int = 4096,
        evaluate_params: ParamsEvaluator | None = None,
    ):
        self.score = choice("score", score, ["holdout", "server"])
        self.mapping = choice("mapping", mapping, ["softmax", "inverse", "robust"])
        self.temperature = number("temperature", temperature, 0.0, lo_open=True)
        self.power = number("power", power, 0.0)
        self.use_tokens = flag("use_tokens", use_tokens)
        self.floor = number("floor", (0.0 if self.mapping == "robust" else 0.05) if floor is None else floor, 0.0, 1.0)
        self.k = number("k", k, 0.0, lo_open=True)
        self.min_margin = number("min_margin", min_margin, 0.0)
        self.holdout_tokens = integer("holdout_tokens", holdout_tokens, 1)
        self.server_tokens = integer("server_tokens", server_tokens, 1)  # read by the runtime's server set
        if self.score == "server" and evaluate_params is None:
            raise ConfigError(
                f"{PREFIX}.score: 'server' needs a server-side validation set, which this runtime does not provide"
            )
        self.evaluate_params = evaluate_params

    def client_options(self, round: int) -> dict[str, Any]:
        return {"holdout_tokens": self.holdout_tokens} if self.score == "holdout" else {}

    def losses(self, global_params: Params, updates: list[Update]) -> list[float]:
        """The loss that scores each client model (inf when it is missing or not finite)."""
        if self.score == "server":
            raw = [float(self.evaluate_params(apply_delta(global_params, u.delta))) for u in updates]
        else:
            # A client whose shard is too small for a holdout slice sends none. Its training
            # loss is no substitute (it is measured on data the model was fitted to, so a tiny
            # shard that is memorised would win every round): it gets the mean of the others'
            # held-out losses, a neutral score. If nobody sent one, all use training loss.
            held = [float(u.holdout_loss) for u in updates if u.holdout_loss is not None and math.isfinite(u.holdout_loss)]
            neutral = sum(held) / len(held) if held else None
            raw = []
            for u in updates:
                if u.holdout_loss is not None:
                    raw.append(float(u.holdout_loss))
                elif neutral is not None:
                    log.warning("dynamic: %s sent no holdout loss; it gets the others' mean %.4f", u.client, neutral)
                    raw.append(neutral)
                else:
                    raw.append(float(u.train_loss))
        return [loss if math.isfinite(loss) else math.inf for loss in raw]

    def weights(self, losses: list[float], tokens: list[int]) -> list[float]:
        """Final normalized weights from losses and token counts (pure; tested directly)."""
        finite = [l for l in losses if math.isfinite(l)]
        if not finite:
            perf = [1.0] * len(losses)
        else:
            worst = max(finite)
            # a non-finite loss gets weight zero before the floor
            scored = [l if math.isfinite(l) else worst for l in losses]
            if self.mapping == "softmax":
                perf = softmax_weights(scored, self.temperature)
            elif self.mapping == "inverse":
                perf = inverse_weights(scored, self.power)
            else:
                perf = robust_weights(scored, self.k, self.min_margin)
            perf = [p if math.isfinite(l) else 0.0 for p, l in zip(perf, losses)]
        raw = [p * n for p, n in zip(perf, tokens)] if self.use_tokens else perf
        if sum(raw) <= 0:
            raw = [1.0] * len(raw)
        return apply_floor(normalize(raw), min(self.floor, 1.0 / len(raw)))

    def aggregate(self, global_params: Params, updates: list[Update], round: int) -> AggregateResult:
        losses = self.losses(global_params, updates)
        weights = self.weights(losses, [u.num_tokens for u in updates])
        mean_delta = weighted_mean([u.delta for u in updates], weights)
        return AggregateResult(
            apply_delta(global_params, mean_delta),
            {
                "weights": {u.client: w for u, w in zip(updates, weights)},
                "scores": {u.client: (l if math.isfinite(l) else None) for u, l in zip(updates, losses)},
                "score": self.score,
            },
        )
