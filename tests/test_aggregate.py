"""The pure aggregation helpers, with exact arithmetic."""

import math

import pytest
import torch

from skyfed.federation.strategies.aggregate import (
    apply_delta,
    apply_floor,
    inverse_weights,
    mix,
    normalize,
    softmax_weights,
    staleness_weight,
    weighted_mean,
    weighted_sum,
)


def test_weighted_mean_and_sum():
    a = {"w": torch.tensor([1.0, 2.0])}
    b = {"w": torch.tensor([3.0, 6.0])}
    assert torch.equal(weighted_mean([a, b], [1, 3])["w"], torch.tensor([2.5, 5.0]))
    assert torch.equal(weighted_sum([a, b], [0.5, 0.25])["w"], torch.tensor([1.25, 2.5]))
    with pytest.raises(ValueError):
        normalize([0, 0])


def test_apply_delta_and_mix():
    p = {"w": torch.tensor([1.0, 1.0])}
    d = {"w": torch.tensor([0.5, -1.0])}
    assert torch.equal(apply_delta(p, d, lr=2.0)["w"], torch.tensor([0.0, 3.0]))
    q = {"w": torch.tensor([3.0, -1.0])}
    assert torch.equal(mix(p, q, 0.25)["w"], torch.tensor([1.5, 0.5]))
    assert torch.equal(mix(p, q, 1.0)["w"], q["w"])


def test_softmax_weights_exact():
    w = softmax_weights([1.0, 2.0], temperature=0.5)
    e = math.exp(-2.0)  # exp(-(2-1)/0.5)
    assert w == pytest.approx([1 / (1 + e), e / (1 + e)], abs=1e-12)
    # shift invariance and equal losses -> equal weights
    assert softmax_weights([1000.0, 1001.0], 0.5) == pytest.approx(w, abs=1e-12)
    assert softmax_weights([3.0, 3.0, 3.0], 1.0) == pytest.approx([1 / 3] * 3)


def test_inverse_weights_exact():
    assert inverse_weights([1.0, 2.0], power=2.0) == pytest.approx([0.8, 0.2])
    assert inverse_weights([2.0, 4.0, 4.0], power=1.0) == pytest.approx([0.5, 0.25, 0.25])
    with pytest.raises(ValueError):
        inverse_weights([0.0, 1.0], 1.0)


def test_floor_raises_small_shares_and_keeps_sum():
    w = apply_floor([0.98, 0.01, 0.01], 0.1)
    assert w == pytest.approx([0.8, 0.1, 0.1])
    # a share just above the floor after rescaling is left alone
    w = apply_floor([0.6, 0.35, 0.05], 0.2)
    assert w[2] == pytest.approx(0.2)
    assert w[0] / w[1] == pytest.approx(0.6 / 0.35)
    assert sum(w) == pytest.approx(1.0)
    # cascade: lowering the big share can push the middle one below the floor
    w = apply_floor([0.9, 0.09, 0.01], 0.3)
    assert min(w) >= 0.3 - 1e-12 and sum(w) == pytest.approx(1.0)
    assert apply_floor([0.9, 0.1], 0.5) == pytest.approx([0.5, 0.5])
    assert apply_floor([0.7, 0.3], 0.0) == pytest.approx([0.7, 0.3])
    with pytest.raises(ValueError):
        apply_floor([0.5, 0.5], 0.6)


def test_staleness_functions():
    assert staleness_weight(7, "constant") == 1.0
    assert staleness_weight(3, "polynomial", a=0.5) == pytest.approx(0.5)  # (3+1)^-0.5
    assert staleness_weight(0, "polynomial", a=2.0) == 1.0
    assert staleness_weight(4, "hinge", a=0.5, b=4) == 1.0
    assert staleness_weight(8, "hinge", a=0.5, b=4) == pytest.approx(1 / 3)  # 1/(0.5*4+1)
    with pytest.raises(ValueError):
        staleness_weight(-1, "constant")
    with pytest.raises(ValueError):
        staleness_weight(1, "exp")
