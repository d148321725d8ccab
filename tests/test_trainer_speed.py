"""The speed settings of LocalTrainer keep its numerics: AdamW kernels agree to rounding,
compile off (and a failed compile) is exactly the eager trainer, state moves between
kernels, bf16 autocast is on only where asked or on CUDA."""

import copy
import logging
import shutil

import numpy as np
import pytest
import torch

from skyfed import compiled_loss
from skyfed.config import TrainConfig, load_config
from skyfed.errors import ConfigError
from skyfed.model import build_model
from skyfed.optim import resolve_impl
from skyfed.precision import autocast_dtype
from skyfed.train import LocalTrainer, lm_loss, lr_at, sample_windows

VOCAB = 256
TOKENS = np.random.default_rng(0).integers(0, VOCAB, 4000)
CPU = torch.device("cpu")


def _cfg(**kw) -> TrainConfig:
    return TrainConfig(batch_size=4, seq_len=16, warmup_steps=2, **kw)


def _trainer(**kw) -> LocalTrainer:
    return LocalTrainer(build_model("gpt2-micro", VOCAB, 0, seed=0), _cfg(**kw), CPU, total_steps=10)


def _params(trainer: LocalTrainer) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in trainer.model.parameters()])


def _trained(steps: int, **kw) -> tuple[LocalTrainer, list[float]]:
    trainer = _trainer(**kw)
    losses: list[float] = []
    trainer.train(TOKENS, steps, np.random.default_rng(1), on_step=lambda i, loss: losses.append(loss))
    return trainer, losses


def test_auto_is_fused_on_cpu_and_explicit_impossible_choice_is_refused():
    assert _trainer().optimizer_impl == "fused"  # torch >= 2.4 has a CPU kernel
    ints = [torch.zeros(2, dtype=torch.int64)]
    assert resolve_impl("auto", ints) == "foreach"
    with pytest.raises(ConfigError, match="train.optimizer_impl: .* no fused AdamW"):
        resolve_impl("fused", ints)
    with pytest.raises(ConfigError, match="train.optimizer_impl"):
        load_config(preset="smoke", overrides=["train.optimizer_impl=turbo"])


def test_adamw_kernels_agree_to_rounding():
    """One step from the same gradients: within 1e-8 (a float32 ulp at the weights' scale).
    Five steps: within 1e-4 = 0.05 lr; the difference after one step changes gradients that
    are at rounding level (zero-initialised biases), and AdamW normalises those to steps of
    about lr, so later steps differ by more than an ulp on those few entries."""
    one = {impl: _params(_trained(1, optimizer_impl=impl)[0]) for impl in ("plain", "foreach", "fused")}
    assert (one["foreach"] - one["plain"]).abs().max() <= 1e-8
    assert (one["fused"] - one["plain"]).abs().max() <= 1e-8
    five = {impl: _trained(5, optimizer_impl=impl) for impl in ("plain", "foreach", "fused")}
    for impl in ("foreach", "fused"):
        assert (_params(five[impl][0]) - _params(five["plain"][0])).abs().max() <= 1e-4
        assert np.allclose(five[impl][1], five["plain"][1], rtol=0, atol=1e-5)


def _old_trainer_params(steps: int) -> torch.Tensor:
    """The trainer before the speed settings: torch's default (plain on CPU) AdamW, eager."""
    cfg = _cfg()
    model = build_model("gpt2-micro", VOCAB, 0, seed=0)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=cfg.betas)
    rng = np.random.default_rng(1)
    model.train()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, 10, cfg)
        loss, _ = lm_loss(model, sample_windows(TOKENS, cfg.batch_size, cfg.seq_len, rng))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(model.parameters()), cfg.grad_clip)
        opt.step()
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def test_plain_eager_trainer_is_bit_identical_to_the_old_one():
    trainer, _ = _trained(4, optimizer_impl="plain", compile="off", autocast="off")
    assert torch.equal(_params(trainer), _old_trainer_params(4))


def test_optimizer_state_resumes_exactly_and_moves_between_kernels():
    whole, _ = _trained(4, optimizer_impl="fused")
    first = _trainer(optimizer_impl="fused")
    rng = np.random.default_rng(1)
    first.train(TOKENS, 2, rng)
    state = first.state_dict()
    resumed = _trainer(optimizer_impl="fused")
    resumed.model.load_state_dict(first.model.state_dict())
    resumed.load_state_dict(state)
    resumed.train(TOKENS, 2, rng)
    assert torch.equal(_params(resumed), _params(whole))
    # a state saved by the plain kernel, loaded under fused: the trainer stays fused
    plain = _trainer(optimizer_impl="plain")
    plain.train(TOKENS, 2, np.random.default_rng(1))
    moved = _trainer(optimizer_impl="fused")
    moved.model.load_state_dict(plain.model.state_dict())
    moved.load_state_dict(copy.deepcopy(plain.state_dict()))  # torch's load shares the tensors
    assert all(g["fused"] is True and not g["foreach"] for g in moved.optimizer.param_groups)
    assert moved.optimizer.state_dict()["state"][0]["exp_avg"].equal(plain.optimizer.state_dict()["state"][0]["exp_avg"])
    moved.train(TOKENS, 1, np.random.default_rng(2))
    plain.train(TOKENS, 1, np.random.default_rng(2))
    assert (_params(moved) - _params(plain)).abs().max() <= 1e-8


def _failing_backend(gm, example_inputs):
    raise RuntimeError("no working compiler in this test")


def test_failed_compile_falls_back_to_eager_once_and_changes_nothing(monkeypatch, caplog):
    monkeypatch.setattr(compiled_loss, "BACKEND", _failing_backend)
    monkeypatch.setattr(compiled_loss, "_broken", None)
    eager = [_params(_trained(3, compile="off")[0]) for _ in range(2)]
    with caplog.at_level(logging.WARNING, logger="skyfed.compiled_loss"):
        tried = [_trained(3, compile="on")[0] for _ in range(2)]  # two clients in one process
    lines = [r for r in caplog.records if r.name == "skyfed.compiled_loss"]
    assert len(lines) == 1 and "torch.compile failed" in lines[0].getMessage()
    assert "no working compiler in this test" in lines[0].getMessage()
    assert not tried[0].runner.compiling and not tried[1].runner.compiling
    for a, b in zip(tried, eager):
        assert torch.equal(_params(a), b)


def test_compile_auto_is_off_on_cpu_and_on_for_cuda(monkeypatch):
    monkeypatch.setattr(compiled_loss, "_broken", None)
    assert not compiled_loss.compile_enabled("auto", CPU)
    assert compiled_loss.compile_enabled("auto", torch.device("cuda"))
    assert compiled_loss.compile_enabled("on", CPU)
    assert not compiled_loss.compile_enabled("off", torch.device("cuda"))


def test_bf16_autocast_only_where_asked_or_on_cuda():
    assert autocast_dtype("auto", CPU) is None
    assert autocast_dtype("off", CPU) is None
    assert autocast_dtype("bf16", CPU) is torch.bfloat16
    if not torch.cuda.is_available():
        assert autocast_dtype("auto", torch.device("cuda")) is None  # guarded: no CUDA here
    fp32, losses32 = _trained(3, autocast="off")
    bf16, losses16 = _trained(3, autocast="bf16")
    assert all(p.dtype == torch.float32 for p in bf16.model.parameters())  # weights stay fp32
    assert not torch.equal(_params(bf16), _params(fp32))  # the bf16 path really ran
    assert np.allclose(losses16, losses32, atol=0.05)


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None, reason="Inductor needs a C++ compiler")
def test_real_compile_trains_like_eager(monkeypatch):
    """torch.compile with Inductor (a C++ compiler is on this machine): same parameters as
    eager within 1e-5 after three steps (fused kernels round differently)."""
    monkeypatch.setattr(compiled_loss, "_broken", None)
    compiled, losses_c = _trained(3, compile="on")
    eager, losses_e = _trained(3, compile="off")
    assert compiled.runner.compiling
    assert (_params(compiled) - _params(eager)).abs().max() <= 1e-5
    assert np.allclose(losses_c, losses_e, rtol=0, atol=1e-5)
