"""Sample text from a Hugging Face model directory written by a run."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from skyfed.errors import DataError


def sample_text(model_dir: str | Path, prompt: str, max_new_tokens: int = 60, temperature: float = 0.8, seed: int = 0) -> str:
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise DataError(f"not a model directory (no config.json): {model_dir}")
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), local_files_only=True)
    model.eval()
    torch.manual_seed(seed)
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    if ids.numel() == 0:
        ids = torch.tensor([[tokenizer.eos_token_id]])
    limit = getattr(model.config, "n_positions", None) or model.config.max_position_embeddings
    with torch.no_grad():
        out = model.generate(
            ids[:, -limit:], max_new_tokens=min(max_new_tokens, limit - min(ids.size(1), limit - 1)),
            do_sample=temperature > 0, temperature=max(temperature, 1e-5), top_k=50,
            pad_token_id=tokenizer.eos_token_id,
        )
    return tokenizer.decode(out[0], skip_special_tokens=True)
