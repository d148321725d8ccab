"""Build a Hugging Face causal LM from a named preset, a config dict or a local directory.

    skyfed presets            # lists the model presets below

The parameters that travel between server and clients are an explicit, named set
(`federated_parameter_names`): every trainable parameter, tied weights once.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch
from transformers import AutoConfig, AutoModelForCausalLM, GPT2Config, LlamaConfig, PreTrainedModel

from skyfed.errors import ConfigError
from skyfed.model_dir import resolve_model_dir


def _gpt2(n_layer: int, n_embd: int, n_head: int, n_positions: int) -> dict[str, Any]:
    return dict(
        model_type="gpt2", n_layer=n_layer, n_embd=n_embd, n_head=n_head, n_positions=n_positions,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )


def _llama(layers: int, hidden: int, heads: int, kv_heads: int, inter: int, ctx: int) -> dict[str, Any]:
    return dict(
        model_type="llama", num_hidden_layers=layers, hidden_size=hidden, num_attention_heads=heads,
        num_key_value_heads=kv_heads, intermediate_size=inter, max_position_embeddings=ctx, tie_word_embeddings=True,
    )


MODEL_PRESETS: dict[str, tuple[str, Callable[[], dict[str, Any]]]] = {
    "gpt2-micro": ("GPT-2, 1 layer, width 32 (tests)", lambda: _gpt2(1, 32, 2, 64)),
    "gpt2-tiny": ("GPT-2, 2 layers, width 128, 4 heads, context 128 (~1M params)", lambda: _gpt2(2, 128, 4, 128)),
    "llama-tiny": ("Llama, 2 layers, width 128, 4 heads, context 128 (~1M params)", lambda: _llama(2, 128, 4, 4, 344, 128)),
    "gpt2-124m": ("GPT-2 small, 12 layers, width 768 (124M params with a 50k vocab)", lambda: _gpt2(12, 768, 12, 1024)),
    "llama-360m": ("Llama, 24 layers, width 1024, GQA 16/4 heads (~360M params with a 32k vocab)", lambda: _llama(24, 1024, 16, 4, 2816, 2048)),
}


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"device: unknown device {name!r} (use auto, cpu, cuda or cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device: {name!r} requested but CUDA is not available on this machine")
    return device


def model_config(preset: str, overrides: dict[str, Any], vocab_size: int, eos_id: int):
    if preset not in MODEL_PRESETS:
        raise ConfigError(f"model.preset: unknown model preset {preset!r}; available: {', '.join(MODEL_PRESETS)}")
    fields = {**MODEL_PRESETS[preset][1](), **overrides}
    fields.update(vocab_size=vocab_size, bos_token_id=eos_id, eos_token_id=eos_id, pad_token_id=None)
    kind = fields.pop("model_type")
    cls = {"gpt2": GPT2Config, "llama": LlamaConfig}[kind]
    try:
        return cls(**fields)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"model.overrides: {exc}") from None


def embedding_rows(model_dir: str | Path) -> int:
    """The number of rows of a pretrained model's input embeddings (its config's vocab_size)."""
    try:
        cfg = AutoConfig.from_pretrained(str(model_dir), local_files_only=True)
    except Exception as exc:
        raise ConfigError(f"model.path: cannot read the model config in {model_dir}: {exc}") from None
    rows = getattr(cfg, "vocab_size", None) or getattr(getattr(cfg, "text_config", None), "vocab_size", None)
    if not rows:
        raise ConfigError(f"model.path: the config in {model_dir} has no vocab_size")
    return int(rows)


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def build_model(
    preset: str = "gpt2-tiny",
    vocab_size: int = 4096,
    eos_id: int = 0,
    overrides: dict[str, Any] | None = None,
    path: str | None = None,
    seed: int = 0,
    dtype: str = "float32",
    peft: Any = None,
    lora_rank: int | None = None,
) -> PreTrainedModel:
    """A freshly initialised model (seeded), or a pretrained one from a local directory,
    in `dtype`; with `peft` (a `skyfed.config.PeftSection`) wrapped as a PEFT model whose
    only trainable tensors are the adapter's (skyfed.lora), at `lora_rank` when a client
    trains a smaller rank than `peft.r` (skyfed.lora_ranks)."""
    torch.manual_seed(seed)
    if path is not None:
        folder = resolve_model_dir(path)
        rows = embedding_rows(folder)
        if vocab_size > rows:
            raise ConfigError(
                f"model.path: the tokenizer has {vocab_size} tokens but the model in {folder} has {rows} embedding rows"
            )
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        try:
            model = AutoModelForCausalLM.from_pretrained(str(folder), local_files_only=True, dtype=DTYPES[dtype])
        except Exception as exc:
            raise ConfigError(f"model.path: cannot load a causal LM from {folder}: {exc}") from None
    else:
        cfg = model_config(preset, overrides or {}, vocab_size, eos_id)
        model = AutoModelForCausalLM.from_config(cfg).to(DTYPES[dtype])
    if peft is not None:
        from skyfed.lora import wrap_peft

        torch.manual_seed(seed)  # the adapter's initial factors are the same on every side
        model = wrap_peft(model, peft, lora_rank)
    return model


def context_length(model: PreTrainedModel) -> int:
    cfg = model.config
    return int(getattr(cfg, "n_positions", None) or getattr(cfg, "max_position_embeddings"))


def federated_parameter_names(model: torch.nn.Module) -> list[str]:
    """The named tensors that travel: trainable parameters (tied weights listed once).

    For a PEFT model (LoRA) these are the adapter's tensors only: the frozen base weights
    never leave a machine, so every strategy and codec works on the adapter."""
    return [name for name, p in model.named_parameters() if p.requires_grad]


def get_params(model: torch.nn.Module, names: list[str]) -> dict[str, torch.Tensor]:
    """Detached copies of the named parameters, on the CPU, in fp32."""
    params = dict(model.named_parameters())
    return {n: params[n].detach().to("cpu", torch.float32, copy=True) for n in names}


@torch.no_grad()
def set_params(model: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    for name, value in tensors.items():
        params[name].copy_(value)


def num_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
