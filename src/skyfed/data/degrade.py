"""Degraded training text for chosen clients (`federation.clients[].degrade`).

Issue 17 asks for clouds whose data differ in quality, to show dynamic weighted
aggregation where it is meant to help. Each function returns a new token array of the
same length and dtype; the validation split is never touched.

- shuffle: `fraction` of the positions (chosen at random) permuted among themselves;
  the multiset of tokens is unchanged, word order is lost (fraction 1: a bag of words).
- duplicate: the first ceil((1 - fraction) * n) tokens (at least one), repeated to n
  tokens: the cloud holds a fraction 1 - fraction of unique text.
- noise: `fraction` of the positions (chosen at random) get uniformly random token ids
  in [0, vocab_size) (a few may draw the id they had).
"""

from __future__ import annotations

import logging
import math

import numpy as np

log = logging.getLogger(__name__)


def _positions(n: int, fraction: float, rng: np.random.Generator) -> np.ndarray:
    return np.sort(rng.choice(n, size=int(round(fraction * n)), replace=False))


def shuffle_tokens(tokens: np.ndarray, fraction: float, rng: np.random.Generator) -> np.ndarray:
    out = np.array(tokens, copy=True)
    idx = _positions(len(out), fraction, rng)
    out[idx] = out[rng.permutation(idx)]
    return out


def duplicate_tokens(tokens: np.ndarray, fraction: float) -> np.ndarray:
    keep = max(1, math.ceil((1.0 - fraction) * len(tokens)))
    return np.resize(np.asarray(tokens)[:keep], len(tokens)).astype(np.asarray(tokens).dtype)


def noise_tokens(tokens: np.ndarray, fraction: float, vocab_size: int, rng: np.random.Generator) -> np.ndarray:
    out = np.array(tokens, copy=True)
    idx = _positions(len(out), fraction, rng)
    out[idx] = rng.integers(0, vocab_size, size=len(idx)).astype(out.dtype)
    return out


def degrade_tokens(tokens: np.ndarray, kind: str, fraction: float, vocab_size: int, seed: list[int]) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if kind == "shuffle":
        return shuffle_tokens(tokens, fraction, rng)
    if kind == "duplicate":
        return duplicate_tokens(tokens, fraction)
    if kind == "noise":
        return noise_tokens(tokens, fraction, vocab_size, rng)
    raise ValueError(f"unknown degradation {kind!r}")


def degrade_clients(cfg, client_tokens: dict[str, np.ndarray], vocab_size: int) -> dict[str, np.ndarray]:
    """`client_tokens` with every client that has a `degrade` spec degraded (seeded by its
    spec's seed, else the experiment seed, and the client's index)."""
    out = dict(client_tokens)
    for index, spec in enumerate(cfg.federation.clients):
        d = spec.degrade
        if d is None or spec.name not in out:
            continue
        seed = [cfg.seed if d.seed is None else d.seed, 4099, index]
        out[spec.name] = degrade_tokens(out[spec.name], d.kind, d.fraction, vocab_size, seed)
        log.info("degraded %s's %d training tokens: %s, fraction %g", spec.name, len(out[spec.name]), d.kind, d.fraction)
    return out
