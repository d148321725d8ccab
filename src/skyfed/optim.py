"""AdamW in the fastest kernel torch has for the parameters' device and dtype.

AdamW is Loshchilov & Hutter 2019, "Decoupled Weight Decay Regularization",
arXiv:1711.05101; torch implements it three ways, which compute the same update and
differ only in float rounding (tests/test_trainer_speed.py: within 1e-6 after a few steps):

- ``fused``: one kernel over all parameters (`fused=True`; CUDA, and CPU since torch 2.4),
- ``foreach``: torch's multi-tensor ops (`foreach=True`),
- ``plain``: a Python loop over the parameters (`foreach=False`; torch's default on CPU).

`train.optimizer_impl: auto` picks fused when torch has a fused kernel for every
parameter's device and dtype, else foreach. An explicit choice that torch cannot honour
is a `ConfigError`.
"""

from __future__ import annotations

from typing import Any, Iterable

import torch

from skyfed.errors import ConfigError

FLAGS = {"fused": {"fused": True, "foreach": None}, "foreach": {"fused": None, "foreach": True},
         "plain": {"fused": None, "foreach": False}}


def fused_available(params: Iterable[torch.Tensor]) -> bool:
    """Whether torch has a fused AdamW kernel for every one of `params` (device and dtype)."""
    try:
        from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

        devices = set(_get_fused_kernels_supported_devices())
    except ImportError:  # an older torch: fused AdamW on CUDA only
        devices = {"cuda"}
    return all(p.device.type in devices and torch.is_floating_point(p) for p in params)


def resolve_impl(impl: str, params: list[torch.Tensor]) -> str:
    """The implementation `impl` (auto | fused | foreach | plain) stands for with `params`."""
    if impl == "auto":
        return "fused" if fused_available(params) else "foreach"
    if impl == "fused" and not fused_available(params):
        kinds = sorted({f"{p.device.type}/{p.dtype}" for p in params})
        raise ConfigError(f"train.optimizer_impl: torch {torch.__version__} has no fused AdamW for {', '.join(kinds)}")
    if impl not in FLAGS:
        raise ConfigError(f"train.optimizer_impl: unknown implementation {impl!r} (auto, fused, foreach or plain)")
    return impl


def decay_groups(params: Iterable[torch.Tensor], weight_decay: float) -> list[dict[str, Any]]:
    """AdamW's parameter groups as skyfed trains: `weight_decay` on matrices (two or more
    dimensions), none on vectors (biases, norms)."""
    params = list(params)
    return [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]


def make_adamw(groups: list[dict[str, Any]], lr: float, betas: tuple[float, float], impl: str) -> tuple[torch.optim.AdamW, str]:
    """AdamW over the parameter `groups` in implementation `impl`; returns it and the
    implementation chosen (fused, foreach or plain)."""
    chosen = resolve_impl(impl, [p for g in groups for p in g["params"]])
    return torch.optim.AdamW(groups, lr=lr, betas=betas, **FLAGS[chosen]), chosen


def keep_impl(optimizer: torch.optim.Optimizer, chosen: str) -> None:
    """After `load_state_dict`: set `chosen`'s flags in every param group again (loading
    copies the saved groups' flags, so a state saved by another implementation would switch
    it) and put each step counter where `chosen` keeps it (fused: on the parameter's
    device; the others: on the CPU)."""
    for group in optimizer.param_groups:
        if "fused" in group:  # an AdamW group (DP-SGD's wrapper shares its groups)
            group.update(FLAGS[chosen])
    for param, state in optimizer.state.items():
        if torch.is_tensor(state.get("step")):
            state["step"] = state["step"].to(param.device if chosen == "fused" else "cpu", torch.float32)
