"""What secure aggregation composes with, as checks the config and the runtimes call.

The server sees only the sum of the masked vectors, so:

- strategies that need only a weighted sum work: the weighted means (fedavg, fedprox),
  the FedOpt family (fedopt, diloco, fedavgm, fedadam, fedyogi, fedadagrad, fedsgd: the
  server optimizer steps on the unmasked mean) and FedBuff (each buffer is one secure
  sum of a cohort of clients that start from one model version, so their common
  staleness weight multiplies the unmasked mean: federation/loops/secure_buffer.py;
  its per-client share cap is refused);
- strategies that look at individual updates cannot: FedAsync applies each update on
  its own as it arrives (a sum of one is the update itself), the performance-weighted
  `dynamic` strategy scores each client's model, and the robust strategies (median,
  trimmed_mean, krum, multikrum, centered_clip) compare updates coordinate by coordinate
  or by distance;
- quantization composes (the ring's bits are the quantization: a 16-bit ring sends half
  the bytes of fp32); sparsification and low rank do not: the masks make every
  coordinate of the vector dense, so top-k, random-k or low-rank factors save nothing
  and their indices or factors would differ per client and could not be summed.
"""

from __future__ import annotations

from typing import Any

from skyfed.errors import ConfigError

SUM_STRATEGIES = frozenset({"fedavg", "fedprox", "fedopt", "diloco", "fedavgm", "fedadam", "fedyogi", "fedadagrad", "fedsgd", "fedbuff"})

_WHY_NOT = {
    "fedasync": "FedAsync applies every update on its own as it arrives, so the server would need each individual update",
    "dynamic": "dynamic weighting scores each client's own model, which the server never sees under secure aggregation",
    "median": "the coordinate-wise median needs every individual update",
    "trimmed_mean": "the trimmed mean sorts individual updates coordinate by coordinate",
    "krum": "Krum compares the distances between individual updates",
    "multikrum": "Multi-Krum compares the distances between individual updates",
    "centered_clip": "centered clipping clips each individual update around a centre",
}

SPARSIFYING_CODECS = frozenset({"topk", "randk", "lowrank"})



def check_strategy(name: str) -> None:
    """Refuse a strategy that needs individual updates (one ConfigError line)."""
    if name in SUM_STRATEGIES:
        return
    why = _WHY_NOT.get(name, f"{name!r} is not known to need only the sum of the updates")
    raise ConfigError(
        f"security.secure_aggregation cannot run with federation.strategy.name={name!r}: {why}; "
        f"use one of {', '.join(sorted(SUM_STRATEGIES))}"
    )


def _codec_name(spec: Any) -> str:
    return spec if isinstance(spec, str) else str(dict(spec).get("name"))


def check_uplink(chain: list[Any]) -> None:
    """Refuse an uplink chain secure aggregation cannot carry (one ConfigError line).

    Sparsifying and low-rank codecs are refused because masks make every coordinate
    dense. A quantizing codec (fp16, bf16, int8, int4, sign) is refused too, with its own
    reason: under secure aggregation the ring *is* the uplink quantizer, and a
    per-client scale could not be summed in it; only the identity fp32 passes."""
    names = list(map(_codec_name, chain))
    sparse = [n for n in names if n in SPARSIFYING_CODECS]
    if sparse:
        raise ConfigError(
            f"security.secure_aggregation cannot run with compression.uplink codec {sparse[0]!r}: masks make every "
            f"coordinate dense, so sparsification or low rank saves nothing and cannot be summed; "
            f"use security.secagg.ring_bits (16 halves the bytes of fp32) instead"
        )
    other = [n for n in names if n != "fp32"]
    if other:
        raise ConfigError(
            f"security.secure_aggregation replaces compression.uplink codec {other[0]!r}: the ring is the uplink "
            f"quantizer; leave compression.uplink empty and set security.secagg.ring_bits (16 or 32)"
        )


def check_compatible(strategy: str, uplink: list[Any]) -> None:
    check_strategy(strategy)
    check_uplink(uplink)


def check_config(cfg: Any) -> None:
    """All of secure aggregation's checks on an `ExperimentConfig` (one ConfigError line):
    the strategy, the uplink chain, and a threshold the client count can meet."""
    check_compatible(cfg.federation.strategy.name, cfg.compression.uplink)
    if cfg.federation.strategy.name == "fedbuff" and cfg.federation.strategy.params.get("max_client_share") is not None:
        raise ConfigError(
            "security.secure_aggregation with fedbuff cannot cap max_client_share: a buffer is one secure sum of a "
            "cohort of distinct clients (federation/loops/secure_buffer.py), not a stream of single arrivals to cap"
        )
    if cfg.federation.strategy.name == "fedavg" and cfg.federation.strategy.params.get("exclude"):
        raise ConfigError(
            "security.secure_aggregation with fedavg cannot exclude clients: each client weights its own share of "
            "the secure sum; drop federation.strategy.params.exclude (an oracle baseline for simulation)"
        )
    check_local_steps(cfg)
    sa, n = cfg.security.secagg, len(cfg.federation.clients)
    if n < 2:
        raise ConfigError("security.secure_aggregation needs at least 2 clients (3 or more to hide anyone's update)")
    group = n if sa.neighbours is None or sa.neighbours >= n - 1 else sa.neighbours + 1
    if sa.threshold is not None and sa.threshold > group:
        raise ConfigError(f"security.secagg.threshold {sa.threshold} exceeds the share-group size {group} ({n} clients)")


def check_local_steps(cfg: Any) -> None:
    """Per-client local steps with secure aggregation: the secure sum bounds every update's
    tokens by train.local_steps' (its weight quantization), and the asynchronous secure
    buffer counts whole tasks."""
    from skyfed.federation.steps import is_asynchronous

    fed, steps = cfg.federation, cfg.train.local_steps
    over = [c.name for c in fed.clients if c.local_steps is not None and c.local_steps > steps]
    if over:
        raise ConfigError(
            f"security.secure_aggregation: federation.clients {over} take more local_steps than train.local_steps "
            f"({steps}), the secure sum's bound on an update's tokens; raise train.local_steps"
        )
    uneven = fed.steps_by_speed or any(c.local_steps is not None for c in fed.clients)
    if uneven and is_asynchronous(cfg):
        raise ConfigError(
            f"security.secure_aggregation with {fed.strategy.name} needs equal local steps (its secure buffer counts "
            "tasks); drop federation.steps_by_speed and clients[].local_steps"
        )
