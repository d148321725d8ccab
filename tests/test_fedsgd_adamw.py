"""fedsgd with `optimizer: adamw`: the server runs the local trainer's AdamW step (the
sync baseline's) on the mean gradient, checked against AdamW worked out by hand."""

import math

import pytest
import torch

from skyfed.config import TrainConfig
from skyfed.errors import ConfigError
from skyfed.federation.messages import Update
from skyfed.federation.strategies import build_strategy

G = {"w": torch.tensor([[1.0]]), "b": torch.tensor([-2.0])}  # a matrix (decayed) and a bias (not)


def grads(client, w, b, n=100):
    return Update(client, 0, 0, {"w": torch.tensor([[w]]), "b": torch.tensor([b])}, n, 1.0, None, 0, 0)


def adamw_by_hand(x, gs, lrs, wd, b1=0.9, b2=0.95, eps=1e-8):
    """AdamW (Loshchilov & Hutter) on one scalar: decoupled decay, bias-corrected moments."""
    m = v = 0.0
    for t, (g, lr) in enumerate(zip(gs, lrs), start=1):
        x *= 1 - lr * wd
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        x -= lr * (m / (1 - b1**t)) / (math.sqrt(v / (1 - b2**t)) + eps)
    return x


def test_server_adamw_step_is_the_trainers_step_with_schedule_and_clipping():
    tc = TrainConfig(lr=0.1, warmup_steps=2, weight_decay=0.5, grad_clip=1.0, schedule="constant")
    s = build_strategy("fedsgd", {"optimizer": "adamw"}, train_config=tc, total_rounds=5)
    # round 0: mean gradient (w, b) = (6, 8) with equal tokens, norm 10, clipped to (0.6, 0.8)
    p1 = s.aggregate(G, [grads("a", 4.0, 10.0), grads("b", 8.0, 6.0)], 0).params
    # round 1: tokens 1:3, mean (0.25*0.4 + 0.75*0.0, 0.25*-0.2 + 0.75*0.2) = (0.1, 0.1), under the clip
    p2 = s.aggregate(p1, [grads("a", 0.4, -0.2, n=100), grads("b", 0.0, 0.2, n=300)], 1).params
    lrs = [0.1 * 1 / 2, 0.1 * 2 / 2]  # linear warmup over 2 rounds
    assert p2["w"].item() == pytest.approx(adamw_by_hand(1.0, [0.6, 0.1], lrs, wd=0.5), abs=1e-6)
    assert p2["b"].item() == pytest.approx(adamw_by_hand(-2.0, [0.8, 0.1], lrs, wd=0.0), abs=1e-6)
    assert s.state_dict()["optimizer"] == "adamw"


def test_server_adamw_follows_the_cosine_schedule_over_the_rounds():
    tc = TrainConfig(lr=0.1, warmup_steps=0, min_lr_ratio=0.1, weight_decay=0.0, grad_clip=0.0)
    s = build_strategy("fedsgd", {"optimizer": "adamw"}, train_config=tc, total_rounds=3)
    params = G
    for r in range(3):
        params = s.aggregate(params, [grads("a", 1.0, 1.0)], r).params
    # the last round's lr: cosine from 0.1 down to 0.01 over rounds 0..3, at round 2
    assert s._opt.param_groups[0]["lr"] == pytest.approx(0.01 + 0.09 * 0.5 * (1 + math.cos(math.pi * 2 / 3)))
    # a constant unit gradient: Adam's normalized step is 1 each round, lr-weighted
    lrs = [0.01 + 0.09 * 0.5 * (1 + math.cos(math.pi * r / 3)) for r in range(3)]
    assert params["w"].item() == pytest.approx(1.0 - sum(lrs), abs=1e-6)


def test_server_adamw_refuses_its_own_lr_and_needs_the_train_section():
    with pytest.raises(ConfigError, match="params.lr: optimizer adamw takes"):
        build_strategy("fedsgd", {"optimizer": "adamw", "lr": 0.1}, train_config=TrainConfig(), total_rounds=3)
    with pytest.raises(ConfigError, match="params.optimizer: adamw needs"):
        build_strategy("fedsgd", {"optimizer": "adamw"})
    with pytest.raises(ConfigError, match="params.optimizer"):
        build_strategy("fedsgd", {"optimizer": "lion"})
