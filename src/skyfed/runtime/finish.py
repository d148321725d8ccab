"""The end of a run: final evaluation on the whole validation split, summary.json and
the Hugging Face model directory (with the tokenizer)."""

from __future__ import annotations

import time
from typing import Any

import torch

from skyfed.metrics import RunDir
from skyfed.train import EvalResult


def save_hf_model(model: torch.nn.Module, tokenizer, run: RunDir, folded_base: bool = False) -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    out = run.path / "model"
    # --- finetune: a LoRA run saves its adapter (run/adapter) and the merged model (run/model)
    from skyfed.lora import is_peft_model, save_adapter_and_merged

    if is_peft_model(model):
        save_adapter_and_merged(model, tokenizer, run.path, folded_base)
        return
    # --- end finetune
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))


def _ratios(rows: list[dict[str, Any]]) -> dict[str, float]:
    """fp32 bytes of the same tensors / actual bytes, per direction (compression ratio)."""
    out = {}
    for d in ("up", "down"):
        fp32, actual = sum(r.get(f"fp32_bytes_{d}", 0) for r in rows), sum(r.get(f"bytes_{d}", 0) for r in rows)
        if fp32 and actual:
            out[f"compression_ratio_{d}"] = fp32 / actual
    return out


def build_summary(
    run: RunDir,
    final: EvalResult,
    unigram_ppl: float,
    wall_time_s: float,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    rows = run.read_metrics()
    total_up = sum(r.get("bytes_up", 0) for r in rows)
    total_down = sum(r.get("bytes_down", 0) for r in rows)
    summary = {
        "rounds": len(rows),
        "final": {
            "val_loss": final.loss,
            "val_ppl": final.ppl,
            "val_token_acc": final.token_acc,
            "val_tokens": final.tokens,
        },
        "unigram_ppl": unigram_ppl,
        "ppl_vs_unigram": final.ppl / unigram_ppl,
        "total": {"bytes_up": total_up, "bytes_down": total_down, "bytes": total_up + total_down, **_ratios(rows)},
        "wall_time_s": wall_time_s,
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    summary.update(extra or {})
    return summary
