"""LoRA fine-tuning with `peft`: wrap a causal LM, save its adapter and the merged model.

LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models",
arXiv:2106.09685) freezes the pretrained weights W and trains W + (alpha / r) B A with
A (r x in) and B (out x r), B starting at zero. `peft` builds the adapter; skyfed then
treats its trainable tensors as the model (`skyfed.model.federated_parameter_names`),
so only the adapter is trained, encoded, sent, aggregated and checkpointed.

    skyfed run --set model.path=DIR --set model.peft.method=lora --set model.peft.r=8
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any

import torch

from skyfed.errors import ConfigError

log = logging.getLogger(__name__)

ADAPTER_DIR = "adapter"  # in the run directory, beside the merged model in model/
BASE_LAYERS = "base_layers.safetensors"  # in adapter/: the adapted layers' base weights after exact folding


def is_peft_model(model: torch.nn.Module) -> bool:
    from peft import PeftModel

    return isinstance(model, PeftModel)


def _has_conv1d(model: torch.nn.Module) -> bool:
    """GPT-2 stores its projections as transformers' Conv1D (weight in x out)."""
    from transformers.pytorch_utils import Conv1D

    return any(isinstance(m, Conv1D) for m in model.modules())


def lora_config(section: Any, model: torch.nn.Module):
    """A `peft.LoraConfig` from the `model.peft` section (skyfed.config.PeftSection)."""
    from peft import LoraConfig

    if section.method != "lora":
        raise ConfigError(f"model.peft.method: unknown method {section.method!r}; available: lora")
    return LoraConfig(
        r=section.r,
        lora_alpha=section.alpha,
        lora_dropout=section.dropout,
        target_modules=list(section.target_modules) if section.target_modules else None,
        fan_in_fan_out=_has_conv1d(model),
        bias="none",
        task_type="CAUSAL_LM",
    )


def wrap_peft(model: torch.nn.Module, section: Any, rank: int | None = None) -> torch.nn.Module:
    """`model` with a fresh LoRA adapter; only the adapter's tensors require gradients.
    With `rank` below `section.r` (a client's `lora_r`), the adapter is the leading `rank`
    components of the rank-`section.r` one, at the same scaling (skyfed.lora_ranks)."""
    from peft import get_peft_model

    try:
        wrapped = get_peft_model(model, lora_config(section, model))
    except ValueError as exc:  # unknown architecture without target_modules, or no module matched
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else repr(exc)
        raise ConfigError(f"model.peft: {first}") from None
    if rank is not None and rank < section.r:
        from skyfed.lora_ranks import shrink_adapter

        wrapped = shrink_adapter(wrapped, section, rank, lora_config)
    trainable = sum(p.numel() for p in wrapped.parameters() if p.requires_grad)
    total = sum(p.numel() for p in wrapped.parameters())
    log.info("LoRA r=%d on %s: %d trainable of %d parameters", rank or section.r,
             sorted(wrapped.peft_config["default"].target_modules), trainable, total)
    return wrapped


def save_adapter_and_merged(model: torch.nn.Module, tokenizer, run_path: Path, folded_base: bool = False) -> None:
    """`run_path/adapter` (PeftModel.from_pretrained loads it) and `run_path/model`, the
    base weights with the adapter merged in (AutoModelForCausalLM.from_pretrained loads
    it). The model itself is left as it was (the merge happens on a copy).

    `folded_base` (exact aggregation, skyfed.lora_exact): the adapted layers' base weights
    changed during training; they go to `adapter/base_layers.safetensors` under their
    names in the base model's state dict, to load into the pretrained model before the
    adapter (`load_folded_base`)."""
    adapter = run_path / ADAPTER_DIR
    model.save_pretrained(str(adapter))
    tokenizer.save_pretrained(str(adapter))
    if folded_base:
        from safetensors.torch import save_file

        from skyfed.lora_exact import base_weight, lora_layers

        prefix = "base_model.model."
        tensors = {f"{layer.module.removeprefix(prefix)}.weight": base_weight(model, layer).detach().cpu().contiguous()
                   for layer in lora_layers(model)}
        save_file(tensors, str(adapter / BASE_LAYERS))
    merged = copy.deepcopy(model).merge_and_unload()
    merged.save_pretrained(str(run_path / "model"))
    tokenizer.save_pretrained(str(run_path / "model"))


@torch.no_grad()
def load_folded_base(base: torch.nn.Module, adapter_dir: str | Path) -> torch.nn.Module:
    """Put an exact-aggregation run's folded base weights (adapter/base_layers.safetensors)
    into the pretrained model `base`, in place; then `PeftModel.from_pretrained(base,
    adapter_dir)` is the trained model. A run without the file leaves `base` unchanged."""
    from safetensors.torch import load_file

    path = Path(adapter_dir) / BASE_LAYERS
    if path.is_file():
        state = base.state_dict()
        for name, t in load_file(str(path)).items():
            state[name].copy_(t)
    return base
