"""Secure aggregation's fixed point, clipping, layout, the in-process hook and the
config refusals."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from skyfed.compression.wire import spec_of
from skyfed.config import load_config
from skyfed.errors import ConfigError, SecAggError
from skyfed.federation.messages import Update
from skyfed.federation.strategies import build_strategy
from skyfed.security.secagg import FixedPoint, RingLayout, SecAggSettings, UpdateEncoder, check_strategy, check_uplink, clip
from skyfed.security.secagg.simulated import secure_mean


@pytest.mark.parametrize("bits, clients", [(16, 3), (16, 10), (32, 10)])
def test_deterministic_round_trip_is_within_half_a_step(bits, clients):
    fp = FixedPoint(bits, 0.5, clients)
    x = np.random.default_rng(0).uniform(-0.6, 0.6, 100_000)
    err = fp.decode(fp.encode(x)) - np.clip(x, -0.5, 0.5)
    assert np.abs(err).max() <= 0.5 * fp.step + 1e-12
    assert fp.scale == pytest.approx(((2 ** (bits - 1) - 1) / clients - 1) / 0.5)
    assert np.array_equal(fp.encode(x), fp.encode(x))  # reproducible


def test_stochastic_rounding_is_within_one_step_and_unbiased():
    fp = FixedPoint(16, 1.0, 10, "stochastic")
    x = np.full(200_000, 0.3 * fp.step + 0.01)  # a value between two steps
    q = fp.decode(fp.encode(x, np.random.default_rng(1)))
    assert np.abs(q - x).max() < fp.step
    assert abs(q.mean() - x[0]) < 0.01 * fp.step  # deterministic rounding would be off by 0.3 steps
    with pytest.raises(SecAggError, match="needs a random generator"):
        fp.encode(x)


@pytest.mark.parametrize("bits", [16, 32])
def test_the_sum_of_n_extreme_values_does_not_wrap(bits):
    n = 10
    fp = FixedPoint(bits, 1.0, n, "stochastic")
    rng = np.random.default_rng(2)
    for sign in (1.0, -1.0):
        parts = [fp.encode(np.full(1000, sign * 1.0), rng) for _ in range(n)]
        ring_sum = np.zeros(1000, dtype=fp.dtype)
        for p in parts:
            ring_sum += p
        assert np.array_equal(fp.signed(ring_sum), sum(fp.signed(p) for p in parts))
        assert np.allclose(fp.decode(ring_sum), sign * n, atol=n * fp.step)


def test_clip_modes():
    x = np.array([3.0, -4.0, 0.05, 12.0])
    assert np.allclose(clip(x, "coordinate", 1.0), [1.0, -1.0, 0.05, 1.0])
    assert np.linalg.norm(clip(x, "l2", 2.0)) == pytest.approx(2.0)
    assert np.allclose(clip(x, "l2", 100.0), x)
    per = clip(x, "l2_per_tensor", 1.0, [slice(0, 2), slice(2, 4)])
    assert np.linalg.norm(per[:2]) == pytest.approx(1.0) and np.linalg.norm(per[2:]) == pytest.approx(1.0)


def test_layout_round_trip_and_fingerprint():
    tensors = {"w": torch.randn(3, 4), "b": torch.randn(5)}
    layout = RingLayout(spec_of(tensors))
    assert layout.size == 17
    back = layout.unflatten(layout.flatten(tensors))
    assert all(torch.equal(back[k], tensors[k]) for k in tensors)
    assert layout.fingerprint != RingLayout(spec_of({"b": tensors["b"], "w": tensors["w"]})).fingerprint
    with pytest.raises(SecAggError, match="does not match the layout"):
        layout.flatten({"w": tensors["w"]})


def make_updates(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = {"w": (40, 30), "b": (7,)}
    return [Update(f"c{i}", 0, 0, {k: torch.randn(s, generator=g) * 0.02 for k, s in shapes.items()},
                   num_tokens=100 * (i + 1), train_loss=2.0 + i) for i in range(n)]


@pytest.mark.parametrize("bits", [16, 32])
def test_secure_mean_equals_the_plain_mean_of_the_quantized_updates(bits):
    updates = make_updates()
    settings = SecAggSettings(ring_bits=bits, bound=0.1)
    spec = spec_of(updates[0].delta)
    participants = [u.client for u in updates] + ["late"]  # "late" set up, then dropped before masking
    out = secure_mean(updates, participants, spec, settings, round=0)
    assert out.survivors == ["c0", "c1", "c2", "c3"] and out.dropped == ["late"]
    # the exact reference: the same weights, the same fixed point, summed in plain int64
    enc = UpdateEncoder(spec, settings, len(participants))
    top = max(u.num_tokens for u in updates)
    q = sum(enc.quantize(u.delta, u.num_tokens / top) for u in updates)
    total_w = sum(u.num_tokens / top for u in updates)
    expected = enc.layout.unflatten(q / enc.fixed.scale / total_w)
    assert all(torch.equal(out.update.delta[k], expected[k]) for k in expected)
    assert out.update.num_tokens == 1000
    assert out.masked_bytes == enc.layout.size * bits // 8
    # and FedAvg on the one secure update matches FedAvg on the plain updates to the fixed point
    params = {k: torch.zeros_like(v) for k, v in updates[0].delta.items()}
    secure = build_strategy("fedavg").aggregate(params, [out.update], 0).params
    plain = build_strategy("fedavg").aggregate(params, updates, 0).params
    for k in params:
        float32_ulps = 4 * torch.finfo(torch.float32).eps * plain[k].abs().max().item()
        assert (secure[k] - plain[k]).abs().max().item() <= enc.fixed.step + float32_ulps


def test_secure_mean_refuses_too_many_dropouts():
    updates = make_updates(2)
    with pytest.raises(SecAggError, match="threshold 3 not met"):
        secure_mean(updates, ["c0", "c1", "x", "y", "z"], spec_of(updates[0].delta), SecAggSettings(), round=0)


def test_config_section_and_refusals_are_one_line():
    cfg = load_config(preset="smoke", overrides=["security.secure_aggregation=true", "security.secagg.ring_bits=16"])
    assert cfg.security.secure_aggregation and cfg.security.secagg.ring_bits == 16
    assert load_config(preset="smoke").security.secure_aggregation is False
    cases = {
        "federation.strategy.name=fedasync": "FedAsync applies every update on its own",
        "federation.strategy.name=dynamic": "dynamic weighting scores each client's own model",
        "compression.uplink=[{name: topk, fraction: 0.01}]": "codec 'topk': masks make every coordinate dense",
        "compression.uplink=[{name: lowrank, rank: 4}]": "codec 'lowrank': masks make every coordinate dense",
        "compression.uplink=[int8]": "replaces compression.uplink codec 'int8'",
        "security.secagg.threshold=4": "threshold 4 exceeds the share-group size 3",
        "security.secagg.neighbours=3": "must be even",
    }
    for override, message in cases.items():
        with pytest.raises(ConfigError, match=message) as err:
            load_config(preset="smoke", overrides=["security.secure_aggregation=true", override])
        assert "\n" not in str(err.value)
    load_config(preset="smoke", overrides=["federation.strategy.name=fedasync"])  # fine without secure aggregation


def test_refusal_functions_name_the_reason():
    for ok in ["fedavg", "fedprox", "fedadam", "diloco", "fedbuff"]:
        check_strategy(ok)
    for robust, why in [("median", "median needs every individual update"), ("krum", "Krum compares"),
                        ("trimmed_mean", "sorts individual updates"), ("centered_clip", "clips each individual")]:
        with pytest.raises(ConfigError, match=why):
            check_strategy(robust)
    check_uplink([])
    check_uplink(["fp32"])
    with pytest.raises(ConfigError, match="'randk'"):
        check_uplink([{"name": "randk", "fraction": 0.1}])


def test_masked_vector_rides_the_wire_container():
    from skyfed.errors import WireFormatError
    from skyfed.security.secagg.payload import pack_masked, unpack_masked
    from skyfed.security.secagg import SecAggParams

    for bits in (16, 32):
        params = SecAggParams(bits, 1000)
        masked = np.random.default_rng(bits).integers(0, 2**bits, 1000, dtype=np.uint64).astype(f"<u{bits // 8}").tobytes()
        wire = pack_masked(masked, params, b"s" * 16, 0.25, round=4, client="aws")
        assert len(wire) - len(masked) < 400  # framing and header only
        back, weight, header = unpack_masked(wire, params, b"s" * 16)
        assert back == masked and weight == 0.25 and header["client"] == "aws"
        with pytest.raises(WireFormatError, match="another ring or session"):
            unpack_masked(wire, params, b"t" * 16)
        corrupt = bytearray(wire)
        corrupt[-3] ^= 1
        with pytest.raises(WireFormatError, match="CRC-32"):
            unpack_masked(bytes(corrupt), params, b"s" * 16)
