"""Error feedback: sent + residual == input exactly, and the residual is carried forward."""

import pytest
import torch

from skyfed.compression.chain import Chain
from skyfed.compression.channel import Uplink
from skyfed.compression.feedback import ErrorFeedback
from skyfed.compression.payload import decode_payload
from skyfed.compression.wire import spec_of


def _update(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(64, 50, generator=g) * 1e-2, "b": torch.randn(33, generator=g)}


@pytest.mark.parametrize("specs", [
    ["int8"], [{"name": "int4", "block": 32}], ["fp16"], ["bf16"], [{"name": "topk", "fraction": 0.05}],
    [{"name": "topk", "fraction": 0.05}, "int8"], [{"name": "randk", "fraction": 0.1}],
])
def test_sent_plus_residual_equals_input_exactly(specs):
    chain, ef = Chain.from_specs(specs), ErrorFeedback()
    for step in range(3):
        x = _update(step)
        compensated = ef.compensate(x)
        if step:
            assert not torch.equal(compensated["w"], x["w"])  # the previous residual is added
        _, sent = ef.encode(x, chain)
        for k in x:
            assert torch.equal(sent[k] + ef.residual[k], compensated[k])


@pytest.mark.parametrize("specs", [[{"name": "randk", "fraction": 0.5}, {"name": "sign", "block": 16}], [{"name": "lowrank", "rank": 2}]])
def test_feedback_identity_holds_to_one_ulp_for_sign_and_lowrank(specs):
    """These codecs' values can be far from the input (no Sterbenz): c - s + s is within an ulp of c."""
    chain, ef = Chain.from_specs(specs), ErrorFeedback()
    for step in range(3):
        compensated = ef.compensate(_update(step))
        _, sent = ef.encode(_update(step), chain)
        for k in sent:
            ulp = torch.finfo(torch.float32).eps * compensated[k].abs().clamp_min(sent[k].abs())
            assert bool(((sent[k] + ef.residual[k] - compensated[k]).abs() <= ulp).all())


def test_topk_with_feedback_eventually_sends_everything():
    chain, ef = Chain.from_specs([{"name": "topk", "fraction": 0.1}]), ErrorFeedback()
    x = {"w": torch.linspace(1, 2, 100)}
    total = torch.zeros(100)
    for _ in range(30):
        _, sent = ef.encode(x, chain)
        total += sent["w"]
    # every coordinate got through; the sum sent + residual is exactly 30 inputs (up to fp32 adds)
    assert bool((total > 0).all())
    assert torch.allclose(total + ef.residual["w"], 30 * x["w"], rtol=1e-5)


def test_uplink_keeps_feedback_only_for_lossy_chains():
    assert Uplink(Chain.from_specs(["int8"]), True).feedback is not None
    assert Uplink(Chain.from_specs(["int8"]), False).feedback is None
    assert Uplink(Chain.from_specs(["fp32"]), True).feedback is None
    assert Uplink(None, True).feedback is None


def test_uplink_payload_decodes_to_what_feedback_counted_as_sent():
    up = Uplink(Chain.from_specs([{"name": "topk", "fraction": 0.1}, {"name": "int8", "stochastic": True}]), True)
    x = _update(0)
    payload = up.encode(x, salt=7, kind="update", round=0)
    got, header = decode_payload(payload, spec_of(x))
    assert header["codecs"][1]["seed"] != 0  # the per-message seed is recorded
    for k in x:
        assert torch.equal(got[k] + up.feedback.residual[k], x[k])


def test_uplink_records_the_rounds_rank_and_the_receiver_decodes_it():
    g = torch.Generator().manual_seed(5)
    x = {"w": torch.randn(256, 64, generator=g)}
    for rnd, rank in [(0, 2), (2, 6), (9, 6)]:
        up = Uplink(Chain.from_specs([{"name": "lowrank", "rank": 32, "rank_by_round": [2, 4, 6]}, "int8"]), True)
        payload = up.encode(x, salt=1, kind="update", round=rnd)
        got, header = decode_payload(payload, spec_of(x))
        assert header["codecs"][0]["rank"] == rank and header["codecs"][0]["rank_by_round"] == [2, 4, 6]
        assert header["codecs"][1]["name"] == "int8"
        ulp = torch.finfo(torch.float32).eps * x["w"].abs().clamp_min(got["w"].abs())
        assert bool(((got["w"] + up.feedback.residual["w"] - x["w"]).abs() <= ulp).all())  # counted as sent
        assert len(payload) < 1024 + rank * (256 + 64) + 4 * rank * (256 + 64) // 256 + 8  # r (m + c) int8 values
