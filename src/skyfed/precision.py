"""Mixed precision of local training: bf16 autocast (`train.autocast`).

Under `torch.autocast(dtype=torch.bfloat16)` matrix products run in bfloat16 while the
weights, gradients and AdamW state stay in the model's dtype (Micikevicius et al. 2018,
"Mixed Precision Training", arXiv:1710.03740; bf16 needs no loss scaling). `auto` turns
it on for a CUDA device that supports bf16 and leaves it off everywhere else: on CPUs
without bf16 matrix units it is slower than fp32. `bf16` asks for it on any device
(CPU autocast exists too); `off` never. Evaluation always runs in the model's dtype, so
perplexities do not depend on this setting's rounding.
"""

from __future__ import annotations

import contextlib

import torch


def autocast_dtype(setting: str, device: torch.device) -> torch.dtype | None:
    """The dtype training forwards autocast to on `device`, or None for no autocast."""
    if setting == "bf16":
        return torch.bfloat16
    if setting == "auto" and device.type == "cuda" and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return None


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """`torch.autocast` to `dtype` on `device`'s type, or a no-op context when `dtype` is None."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)
