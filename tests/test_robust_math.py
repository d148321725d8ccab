"""The arithmetic of the robust aggregators and of the attacks, with exact numbers."""

import math

import numpy as np
import pytest
import torch

from skyfed.federation import attacks
from skyfed.federation.strategies.robust import robust_math as rm


def U(*rows):
    """Updates with one tensor 'w' each (and a second tensor 'b' = first coordinate * 10)."""
    return [{"w": torch.tensor(r, dtype=torch.float32), "b": torch.tensor([r[0] * 10.0])} for r in rows]


def test_coordinate_median_odd_and_even():
    odd = rm.coordinate_median(U([1.0, 5.0], [3.0, -1.0], [100.0, 2.0]))
    assert odd["w"].tolist() == [3.0, 2.0] and odd["b"].tolist() == [30.0]
    even = rm.coordinate_median(U([1.0, 5.0], [3.0, -1.0], [100.0, 2.0], [4.0, 0.0]))
    assert even["w"].tolist() == [3.5, 1.0]  # (3 + 4) / 2, (0 + 2) / 2


def test_trimmed_mean_drops_each_end():
    ups = U([1.0, 0.0], [2.0, 10.0], [3.0, 20.0], [4.0, 30.0], [1000.0, -1000.0])
    assert rm.trim_count(5, 0.2) == 1 and rm.trim_count(5, 0.19) == 0 and rm.trim_count(4, 0.49) == 1
    out = rm.trimmed_mean(ups, 1)
    assert out["w"].tolist() == [3.0, 10.0]  # (2+3+4)/3, (0+10+20)/3
    assert rm.trimmed_mean(ups, 0)["w"].tolist() == pytest.approx([202.0, -188.0])
    with pytest.raises(ValueError):
        rm.trimmed_mean(ups, 3)


def test_pairwise_distances_and_krum_scores():
    ups = [{"w": torch.tensor([0.0, 0.0])}, {"w": torch.tensor([1.0, 0.0])}, {"w": torch.tensor([0.0, 2.0])},
           {"w": torch.tensor([1.0, 1.0])}, {"w": torch.tensor([10.0, 10.0])}]
    d = rm.pairwise_sq_distances(ups)
    assert d[0].tolist() == [0.0, 1.0, 4.0, 2.0, 200.0]
    assert d[4].tolist() == [200.0, 181.0, 164.0, 162.0, 0.0]
    assert torch.equal(d, d.T)
    # n = 5, f = 1: each score sums the 2 smallest distances to the others
    scores = rm.krum_scores(d, f=1)
    assert scores == [3.0, 2.0, 6.0, 3.0, 326.0]
    assert rm.lowest(scores, 1) == [1] and rm.lowest(scores, 3) == [0, 1, 3]  # tie 3.0: earlier index


def test_global_norm_and_clip():
    u = {"a": torch.tensor([3.0]), "b": torch.tensor([0.0, 4.0])}
    assert rm.global_norm(u) == 5.0
    same, n = rm.clip_to_norm(u, 5.0)
    assert same is u and n == 5.0
    c, n = rm.clip_to_norm(u, 1.0)
    assert n == 5.0 and c["a"].tolist() == pytest.approx([0.6]) and c["b"].tolist() == pytest.approx([0.0, 0.8])
    assert rm.global_norm(c) == pytest.approx(1.0)


def test_centered_clip_one_iteration_exact():
    ups = [{"w": torch.tensor([1.0, 0.0])}, {"w": torch.tensor([0.0, 1.0])}, {"w": torch.tensor([30.0, 40.0])}]
    zero = {"w": torch.zeros(2)}
    # tau = 1: the first two are within the radius (norm 1), the third (norm 50) pulls by 1/50 of itself
    v, factors = rm.centered_clip(ups, zero, tau=1.0, iterations=1)
    assert factors == [1.0, 1.0, pytest.approx(0.02)]
    assert v["w"].tolist() == pytest.approx([(1 + 0 + 0.6) / 3, (0 + 1 + 0.8) / 3])
    # a huge tau is the plain mean; the adaptive radius is the median distance (1 here)
    assert rm.centered_clip(ups, zero, tau=1e9, iterations=1)[0]["w"].tolist() == pytest.approx([31 / 3, 41 / 3])
    adaptive, f = rm.centered_clip(ups, zero, tau=None, iterations=1)
    assert adaptive["w"].tolist() == pytest.approx(v["w"].tolist())


def test_mad_band():
    # median 2, absolute deviations sorted [0, 0, 1, 1, 8] -> MAD 1
    assert rm.mad_band([1.0, 2.0, 3.0, 10.0, 2.0], k=3.0, min_margin=0.0) == (2.0 - 3.0, 2.0 + 3.0)
    assert rm.mad_band([2.0, 2.0, 2.0], k=3.0, min_margin=0.5) == (1.5, 2.5)
    assert rm.mad_band([math.inf, math.nan], 3.0, 0.0) == (-math.inf, math.inf)
    assert rm.mad_band([1.0, math.inf, 1.5], 1.0, 0.0) == (1.0, 1.5)  # median 1.25, MAD 0.25


def test_mean_weighted():
    out = rm.mean(U([1.0, 2.0], [3.0, 6.0]), [1.0, 3.0])
    assert out["w"].tolist() == [2.5, 5.0]


def test_attack_arithmetic():
    d = {"w": torch.tensor([1.0, -2.0])}
    assert attacks.sign_flip(d, 3.0)["w"].tolist() == [-3.0, 6.0]
    assert attacks.scale(d, 10.0)["w"].tolist() == [10.0, -20.0]
    g = torch.Generator().manual_seed(0)
    big = {"w": torch.full((10_000,), 0.01)}  # norm 1
    noisy = attacks.noise(big, 5.0, g)["w"]
    assert noisy.norm().item() == pytest.approx(5.0, rel=0.05)
    assert abs(noisy.mean().item()) < 0.01
    two = {"a": torch.ones(3), "b": torch.ones(2)}
    ab = attacks.noise(two, 1.0, torch.Generator().manual_seed(1))
    ba = attacks.noise({"b": two["b"], "a": two["a"]}, 1.0, torch.Generator().manual_seed(1))
    assert all(torch.equal(ab[n], ba[n]) for n in two)  # the same noise per name, whatever the dict order
    honest = [{"w": torch.tensor([1.0, 0.0])}, {"w": torch.tensor([3.0, 0.0])}]
    assert attacks.alie(honest, 2.0)["w"].tolist() == [0.0, 0.0]  # mean 2 - 2 * std 1
    assert attacks.alie_z(5, 1) == pytest.approx(0.2533471, abs=1e-6)  # Phi^-1(0.6)
    assert attacks.alie_z(50, 24) == pytest.approx(1.7506861, abs=1e-6)  # s = 2, Phi^-1(0.96)


def test_junk_tokens_seeded_and_in_range():
    a = attacks.junk_tokens(1000, 512, [0, 1], np.dtype(np.uint16))
    b = attacks.junk_tokens(1000, 512, [0, 1], np.dtype(np.uint16))
    assert np.array_equal(a, b) and a.dtype == np.uint16 and a.min() >= 0 and a.max() < 512
    assert len(np.unique(a)) > 400
    assert not np.array_equal(a, attacks.junk_tokens(1000, 512, [0, 2], np.dtype(np.uint16)))
