"""Degraded clouds (issue 17 item 3): per-client data degradation and the robust dynamic weighting."""

import numpy as np
import pytest
import torch

from skyfed.config import load_config
from skyfed.data.degrade import degrade_tokens, duplicate_tokens, noise_tokens, shuffle_tokens
from skyfed.errors import ConfigError
from skyfed.federation.messages import Update
from skyfed.federation.strategies import build_strategy
from skyfed.federation.strategies.aggregate import robust_weights
from skyfed.runtime.setup import prepare_data

TOKENS = np.arange(1000, dtype=np.uint16) % 97  # a tiny "corpus" with repeated ids


def _rng(seed=0):
    return np.random.default_rng(seed)


def test_shuffle_keeps_the_multiset_and_moves_only_the_chosen_fraction():
    out = shuffle_tokens(TOKENS, 0.3, _rng())
    assert out.dtype == TOKENS.dtype and len(out) == len(TOKENS)
    assert np.array_equal(np.sort(out), np.sort(TOKENS))
    changed = int((out != TOKENS).sum())
    assert 0 < changed <= 300  # only the 300 chosen positions may change
    assert np.array_equal(shuffle_tokens(TOKENS, 0.0, _rng()), TOKENS)
    full = shuffle_tokens(TOKENS, 1.0, _rng())
    assert np.array_equal(np.bincount(full), np.bincount(TOKENS)) and (full != TOKENS).mean() > 0.9


def test_duplicate_repeats_the_first_unique_part():
    out = duplicate_tokens(TOKENS, 0.75)  # 250 unique tokens, repeated 4 times
    assert len(out) == 1000 and out.dtype == TOKENS.dtype
    assert np.array_equal(out, np.tile(TOKENS[:250], 4))
    assert np.array_equal(duplicate_tokens(TOKENS, 0.0), TOKENS)
    assert np.array_equal(duplicate_tokens(TOKENS, 1.0), np.full(1000, TOKENS[0]))  # at least one token kept
    assert np.array_equal(duplicate_tokens(TOKENS[:10], 0.5), np.tile(TOKENS[:5], 2))


def test_noise_replaces_about_the_fraction_with_ids_in_the_vocabulary():
    out = noise_tokens(TOKENS, 0.2, 5000, _rng())
    changed = (out != TOKENS).mean()
    assert 0.19 <= changed <= 0.2  # 200 positions redrawn, a few may draw their old id
    assert int(out.max()) < 5000 and out.dtype == TOKENS.dtype
    assert int((out != TOKENS).sum()) >= 195


def test_degradation_is_seeded():
    a = degrade_tokens(TOKENS, "noise", 0.5, 300, [0, 1])
    assert np.array_equal(a, degrade_tokens(TOKENS, "noise", 0.5, 300, [0, 1]))
    assert not np.array_equal(a, degrade_tokens(TOKENS, "noise", 0.5, 300, [0, 2]))


def test_config_spelling_and_bad_values():
    cfg = load_config(preset="smoke", overrides=[
        "federation.clients=[{name: aws}, {name: gcp, degrade: {kind: shuffle, fraction: 0.5}}]"])
    assert cfg.federation.clients[1].degrade.kind == "shuffle" and cfg.federation.clients[0].degrade is None
    with pytest.raises(ConfigError, match="degrade.kind"):
        load_config(preset="smoke", overrides=["federation.clients=[{name: aws, degrade: {kind: blur}}]"])
    with pytest.raises(ConfigError, match="degrade.fraction"):
        load_config(preset="smoke", overrides=["federation.clients=[{name: aws, degrade: {kind: noise, fraction: 1.5}}]"])


def test_prepare_data_degrades_only_the_chosen_client_and_not_validation():
    clean = load_config(preset="smoke", overrides=["federation.clients=[{name: a}, {name: b}]"])
    dirty = load_config(preset="smoke", overrides=["federation.clients=[{name: a}, {name: b, degrade: {kind: shuffle}}]"])
    c, d = prepare_data(clean), prepare_data(dirty)
    assert np.array_equal(c.client_tokens["a"], d.client_tokens["a"])
    assert np.array_equal(c.valid.tokens, d.valid.tokens)
    assert np.array_equal(np.sort(c.client_tokens["b"]), np.sort(d.client_tokens["b"]))
    assert (c.client_tokens["b"] != d.client_tokens["b"]).mean() > 0.9


# ---------------------------------------------------------------- robust weighting

G = {"w": torch.zeros(2)}


def _updates(losses, tokens=None):
    tokens = tokens or [100] * len(losses)
    return [Update(f"c{i}", 0, 0, {"w": torch.full((2,), float(i))}, n, train_loss=1.0, holdout_loss=l)
            for i, (l, n) in enumerate(zip(losses, tokens))]


def test_robust_weights_numbers():
    # median 4.14, MAD 0.06: full weight up to 4.14 + 2 * 0.06 = 4.26
    w = robust_weights([4.0, 4.14, 4.2], k=2.0, min_margin=0.02)
    assert w == pytest.approx([1 / 3] * 3)
    # median 4.14, MAD 0.14: band up to 4.42, width 0.14; 4.56 is one width past the band
    w = robust_weights([4.0, 4.14, 4.56], k=2.0, min_margin=0.02)
    raw = [1.0, 1.0, np.exp(-0.5)]
    assert w == pytest.approx([x / sum(raw) for x in raw])


def test_softmax_splits_equal_clouds_and_robust_does_not():
    # two equal IID clouds 0.14 nats apart, one shuffled-text cloud far worse (the setting)
    losses = [4.00, 4.14, 6.0]
    soft = build_strategy("dynamic", {}).aggregate(G, _updates(losses), 0).metrics["weights"]
    assert soft["c0"] / soft["c1"] > 3  # softmax at temperature 0.1: exp(1.4) = 4.06 apart
    assert soft["c2"] == pytest.approx(0.05)  # the 5% floor lets the junk in
    rob = build_strategy("dynamic", {"mapping": "robust"}).aggregate(G, _updates(losses), 0).metrics["weights"]
    assert abs(rob["c0"] - rob["c1"]) <= 0.2 * max(rob["c0"], rob["c1"])
    assert rob["c0"] == pytest.approx(0.5) and rob["c2"] < 1e-9


def test_robust_two_of_five_degraded():
    losses = [4.00, 4.05, 4.10, 4.9, 5.6]  # three clean clouds, noise and shuffle
    w = build_strategy("dynamic", {"mapping": "robust"}).aggregate(G, _updates(losses), 0).metrics["weights"]
    clean = [w["c0"], w["c1"], w["c2"]]
    assert max(clean) <= 1.2 * min(clean)
    assert w["c3"] < 1e-6 and w["c4"] < 1e-6 and sum(clean) == pytest.approx(1.0)


def test_robust_keeps_token_weights_and_old_behaviour_stays_reachable():
    w = build_strategy("dynamic", {"mapping": "robust"}).aggregate(G, _updates([4.0, 4.1, 4.05], [100, 300, 600]), 0)
    assert list(w.metrics["weights"].values()) == pytest.approx([0.1, 0.3, 0.6])
    old = build_strategy("dynamic", {"mapping": "softmax", "temperature": 0.1, "floor": 0.05})
    assert old.floor == 0.05 and build_strategy("dynamic", {}).floor == 0.05
    assert build_strategy("dynamic", {"mapping": "robust"}).floor == 0.0
    with pytest.raises(ConfigError, match="params.k"):
        build_strategy("dynamic", {"mapping": "robust", "k": 0})


def test_fedavg_exclude_is_fedavg_of_the_rest():
    ups = _updates([1.0, 1.0, 1.0], [100, 300, 600])
    out = build_strategy("fedavg", {"exclude": ["c2"]}).aggregate(G, ups, 0)
    assert out.metrics["weights"] == pytest.approx({"c0": 0.25, "c1": 0.75, "c2": 0.0})
    assert torch.allclose(out.params["w"], torch.full((2,), -0.75))  # theta - (0.25 * 0 + 0.75 * 1)
    with pytest.raises(ConfigError, match="params.exclude"):
        build_strategy("fedavg", {"exclude": "c2"})
