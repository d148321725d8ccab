"""Client-level DP-FedAvg: clipping, server and distributed noise, equal weights, refusals."""

from __future__ import annotations

import math

import pytest
import torch

from skyfed.config import load_config
from skyfed.errors import ConfigError
from skyfed.federation.messages import Update
from skyfed.federation.strategies import build_strategy
from skyfed.federation.strategies.mean import RunningMean
from skyfed.compression.wire import spec_of
from skyfed.security.client import client_privacy
from skyfed.security.dp import ClientDP, clip_update, cohort_size, global_norm
from skyfed.security.dp_strategy import DPMean
from skyfed.security.privacy import apply_privacy


def _update(seed: int, scale: float, shapes=((30, 20), (50,))) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {f"p{i}": torch.randn(s, generator=g) * scale for i, s in enumerate(shapes)}


def test_clip_scales_a_large_update_to_norm_exactly_c():
    u = _update(0, 3.0)
    assert global_norm(u) > 10
    clipped, norm = clip_update(u, 0.7)
    assert norm == pytest.approx(global_norm(u), rel=1e-12)
    assert global_norm(clipped) == pytest.approx(0.7, rel=1e-6)
    ratio = clipped["p0"] / u["p0"]  # one common scale, direction kept
    assert torch.allclose(ratio, torch.full_like(ratio, 0.7 / norm), rtol=1e-5)


def test_clip_leaves_a_small_update_unchanged():
    u = _update(1, 1e-3)
    assert global_norm(u) < 0.7
    clipped, _ = clip_update(u, 0.7)
    for name in u:
        assert torch.equal(clipped[name], u[name])


def _dp_fedavg(sigma: float, clip: float, cohort: int, noise: str, seed: int) -> DPMean:
    return DPMean(build_strategy("fedavg"), clip, sigma, cohort, noise, generator=torch.Generator().manual_seed(seed))


def test_server_noise_has_std_sigma_c_over_cohort():
    """Zero updates: the new model minus the old is -N(0, (sigma C)^2) / cohort per coordinate."""
    sigma, clip, cohort, d = 1.3, 0.5, 4, 200_000
    strategy = _dp_fedavg(sigma, clip, cohort, "server", seed=5)
    zeros = {"w": torch.zeros(d)}
    updates = [Update(f"c{i}", 0, 0, {"w": torch.zeros(d)}, num_tokens=100 * (i + 1), train_loss=0.0) for i in range(cohort)]
    out = strategy.aggregate(zeros, updates, 0)
    step = out.params["w"].double()
    # std estimate of 200k normals: relative standard error 1/sqrt(2d) = 0.16%
    assert step.std().item() == pytest.approx(sigma * clip / cohort, rel=0.01)
    assert abs(step.mean().item()) < 5 * sigma * clip / cohort / math.sqrt(d)
    assert out.metrics["weights"] == {f"c{i}": 0.25 for i in range(cohort)}


def test_server_step_is_equal_weight_sum_of_clipped_updates_plus_noise_over_cohort():
    """Token counts do not weigh: theta - (sum_i clip(delta_i) + noise) / cohort, exactly."""
    clip, sigma, cohort = 1.0, 0.8, 3
    deltas = [_update(10 + i, 0.5 * (i + 1)) for i in range(3)]  # norms about 12, 24, 37: all clipped
    updates = [Update(f"c{i}", 0, 0, d, num_tokens=10 ** (i + 1), train_loss=0.0) for i, d in enumerate(deltas)]
    params = {n: torch.zeros_like(t) for n, t in deltas[0].items()}
    out = _dp_fedavg(sigma, clip, cohort, "server", seed=9).aggregate(params, updates, 0)
    g = torch.Generator().manual_seed(9)
    for name, p in params.items():
        total = sum(clip_update(d, clip)[0][name] for d in deltas)
        noise = torch.randn(p.shape, generator=g) * (sigma * clip)
        expected = p - (total + noise) / cohort
        assert torch.allclose(out.params[name], expected, atol=1e-6), name


def test_server_clips_an_unclipped_update_in_server_mode():
    """A client that skipped clipping cannot raise the sensitivity: the server clips too."""
    strategy = _dp_fedavg(1.0, 0.5, 1, "server", seed=0)
    running = RunningMean(spec_of(_update(0, 1.0)))
    strategy.fold(running, Update("c0", 0, 0, _update(0, 100.0), 1, 0.0))
    assert global_norm(running.acc) == pytest.approx(0.5, rel=1e-6)


def test_distributed_noise_shares_sum_to_sigma_c():
    """Each of n clients adds N(0, sigma^2 C^2 / n): their sum has std sigma * C."""
    cfg = load_config(None, "smoke", [
        "security.dp.clip=0.5", "security.dp.noise_multiplier=2.0", "security.dp.noise=distributed",
        "federation.clients=[{name: a}, {name: b}, {name: c}, {name: d}, {name: e}]",
    ])
    shares = [client_privacy(cfg).update for _ in range(5)]
    assert [s.noise_std for s in shares] == [pytest.approx(2.0 * 0.5 / math.sqrt(5))] * 5
    d = 200_000
    total = sum(s.privatize({"w": torch.zeros(d)})["w"].double() for s in shares)
    assert total.std().item() == pytest.approx(2.0 * 0.5, rel=0.01)
    # each client's generator is seeded by the OS: two clients never draw the same noise
    a, b = (s.privatize({"w": torch.zeros(8)})["w"] for s in shares[:2])
    assert not torch.equal(a, b)


def test_distributed_mode_server_adds_no_noise_and_does_not_clip():
    strategy = _dp_fedavg(1.0, 0.5, 2, "distributed", seed=0)
    deltas = [_update(20, 1.0), _update(21, 1.0)]
    updates = [Update(f"c{i}", 0, 0, d, 5, 0.0) for i, d in enumerate(deltas)]
    params = {n: torch.zeros_like(t) for n, t in deltas[0].items()}
    out = strategy.aggregate(params, updates, 0)
    for name in params:
        assert torch.allclose(out.params[name], -(deltas[0][name] + deltas[1][name]) / 2, atol=1e-6)


def test_fixed_denominator_when_a_client_is_missing():
    """The mean divides by the cohort size fixed in advance, not by the arrivals."""
    strategy = _dp_fedavg(1.0, 10.0, 3, "distributed", seed=0)
    d = {"w": torch.ones(4)}
    out = strategy.aggregate({"w": torch.zeros(4)}, [Update("a", 0, 0, d, 1, 0.0), Update("b", 0, 0, d, 1, 0.0)], 0)
    assert torch.allclose(out.params["w"], torch.full((4,), -2.0 / 3.0))


def test_dp_wraps_the_fedopt_family_and_keeps_its_state():
    cfg = load_config(None, "smoke", ["federation.strategy.name=fedadam", "security.dp.clip=1", "security.dp.noise_multiplier=1"])
    observers: list = []
    inner = build_strategy("fedadam")
    wrapped = apply_privacy(cfg, inner, observers)
    assert isinstance(wrapped, DPMean) and wrapped.inner is inner and len(observers) == 1
    params = {"w": torch.zeros(3)}
    wrapped.aggregate(params, [Update("a", 0, 0, {"w": torch.ones(3)}, 1, 0.0)], 0)
    assert wrapped.state_dict()["optimizer"] == "adam" and "state" in wrapped.state_dict()


def test_dp_off_leaves_the_strategy_alone():
    cfg = load_config(None, "smoke", [])
    observers: list = []
    s = build_strategy("fedavg")
    assert apply_privacy(cfg, s, observers) is s and observers == []
    assert client_privacy(cfg) is None


@pytest.mark.parametrize("overrides, words", [
    (["federation.strategy.name=fedasync"], "weighted-mean"),
    (["federation.strategy.name=fedbuff"], "weighted-mean"),
    (["federation.strategy.name=dynamic"], "weighted-mean"),
    (["security.dp.noise=distributed", "compression.uplink=[int8]"], "fp32 uplink"),
])
def test_refused_combinations_are_one_config_error(overrides, words):
    with pytest.raises(ConfigError, match=words):
        load_config(None, "smoke", ["security.dp.clip=1", "security.dp.noise_multiplier=1", *overrides])


def test_clip_without_noise_is_refused():
    with pytest.raises(ConfigError, match="go together"):
        load_config(None, "smoke", ["security.dp.clip=1"])


def test_document_dp_with_fedsgd_is_refused():
    with pytest.raises(ConfigError, match="fedsgd"):
        load_config(None, "smoke", ["federation.strategy.name=fedsgd", "security.dp.document.noise_multiplier=1"])


def test_cohort_size_matches_client_selection():
    import numpy as np

    from skyfed.federation.engine import select_clients

    for n, frac, mn in [(3, 1.0, 1), (10, 0.3, 1), (10, 0.05, 2), (7, 0.5, 1)]:
        picked = select_clients([str(i) for i in range(n)], frac, mn, np.random.default_rng(0))
        assert cohort_size(n, frac, mn) == len(picked)
