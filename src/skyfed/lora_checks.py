"""What a config may combine with exact LoRA aggregation and per-client LoRA ranks.

Each refusal is one line naming the keys (a ConfigError, exit code 2 from the CLI),
raised when the config is loaded, before any work.
"""

from __future__ import annotations

from typing import Any

from skyfed.errors import ConfigError

# Strategies whose aggregate is the token-weighted mean of the client models: only for
# these is "the average of the clients' effective weights" the model FedAvg meant.
EXACT_STRATEGIES = ("fedavg", "fedprox")


def check_federated_lora(cfg: Any) -> None:
    """Refuse (ConfigError) `federation.clients[].lora_r` and `model.peft.aggregation: exact`
    where they cannot work: without LoRA, above the server's rank, with secure aggregation
    or Ray (one replica for all clients), and exact folding with a strategy that is not a
    mean of client models, norm bounding, differential privacy or bfloat16 base weights."""
    peft = cfg.model.peft
    ranked = [c for c in cfg.federation.clients if c.lora_r is not None]
    if ranked and peft is None:
        raise ConfigError(f"federation.clients[{ranked[0].name}].lora_r needs model.peft (a LoRA run)")
    if peft is None:
        return
    for c in ranked:
        if c.lora_r > peft.r:
            raise ConfigError(
                f"federation.clients[{c.name}].lora_r={c.lora_r} is above model.peft.r={peft.r} (the server's rank, the largest)"
            )
    hetero = any(c.lora_r < peft.r for c in ranked)
    exact = peft.aggregation == "exact"
    what = "model.peft.aggregation=exact" if exact else "federation.clients[].lora_r"
    if not (hetero or exact):
        return
    if cfg.security.secure_aggregation:
        raise ConfigError(f"{what} does not work with security.secure_aggregation (the server must see each client's factors)")
    if cfg.runtime == "ray":
        raise ConfigError(f"{what} does not work with runtime: ray (its actors share one model replica); use runtime: inprocess")
    if not exact:
        return
    strat = cfg.federation.strategy
    if strat.name not in EXACT_STRATEGIES:
        raise ConfigError(
            f"model.peft.aggregation=exact needs a strategy that averages client models ({', '.join(EXACT_STRATEGIES)}), "
            f"not {strat.name!r}"
        )
    if strat.norm_bound is not None:
        raise ConfigError("model.peft.aggregation=exact does not work with federation.strategy.norm_bound")
    dp = cfg.security.dp
    if dp.client_level or dp.document is not None:
        raise ConfigError("model.peft.aggregation=exact does not work with security.dp (the folded residual is not privatized)")
    if cfg.model.dtype != "float32":
        raise ConfigError("model.peft.aggregation=exact folds residuals into the base weights: it needs model.dtype=float32")
