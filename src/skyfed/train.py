"""Local training and evaluation in plain PyTorch.

`LocalTrainer.train` runs K steps of AdamW on random windows of a client's tokens with
gradient clipping and a warmup + cosine schedule over the whole run; `evaluate`
returns loss, perplexity and next-token top-1 accuracy on evenly spaced windows.

How fast a step runs (docs/speed.md, bench/trainer_speed.py): AdamW's kernel is fused
where torch has one (`train.optimizer_impl`, skyfed.optim), the forward and backward may
go through `torch.compile` (`train.compile`, skyfed.compiled_loss) and bf16 autocast
(`train.autocast`, skyfed.precision); the loss is read back from the device once per
run unless `on_step` wants it every step. CPU threads are set per process, not here
(`skyfed.runtime.setup.apply_threads`).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from skyfed.compiled_loss import StepRunner, compile_enabled
from skyfed.config import TrainConfig
from skyfed.optim import decay_groups, keep_impl, make_adamw
from skyfed.precision import autocast, autocast_dtype


@dataclass
class TrainStats:
    steps: int
    tokens: int
    loss_mean: float
    loss_last: float
    seconds: float


@dataclass
class EvalResult:
    loss: float
    ppl: float
    token_acc: float
    tokens: int


def lr_at(step: int, total_steps: int, cfg: TrainConfig) -> float:
    """Linear warmup, then cosine decay to `min_lr_ratio * lr` at `total_steps` x
    `schedule_stretch` (a stretch above 1 stops before the decay's end)."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    end = total_steps * cfg.schedule_stretch
    progress = min(1.0, (step - cfg.warmup_steps) / max(1.0, end - cfg.warmup_steps))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def sample_windows(tokens: np.ndarray, batch_size: int, seq_len: int, rng: np.random.Generator) -> torch.Tensor:
    """`batch_size` random windows of `seq_len + 1` consecutive tokens, as int64."""
    if len(tokens) < seq_len + 2:
        raise ValueError(f"shard of {len(tokens)} tokens is shorter than one window of {seq_len + 1}")
    starts = rng.integers(0, len(tokens) - seq_len - 1, size=batch_size)
    idx = starts[:, None] + np.arange(seq_len + 1)[None, :]
    return torch.from_numpy(np.asarray(tokens[idx], dtype=np.int64))


def lm_loss(model: torch.nn.Module, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean next-token cross-entropy, logits) for a batch of windows."""
    logits = model(input_ids=batch[:, :-1]).logits
    loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), batch[:, 1:].reshape(-1))
    return loss, logits


def enable_activation_checkpointing(model: torch.nn.Module) -> None:
    """Recompute activations in the backward pass (Chen et al. 2016, "Training Deep Nets
    with Sublinear Memory Cost"), with Hugging Face's per-layer checkpointing
    (`activation_checkpointing_enable`, `gradient_checkpointing_enable` before
    transformers 5.x); the non-reentrant variant also works when the inputs need no
    gradient (frozen embeddings under LoRA). The KV cache, useless in training, is off."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "use_cache", False):
        config.use_cache = False


class LocalTrainer:
    """One client's model and optimizer; the optimizer state may persist across rounds."""

    def __init__(self, model: torch.nn.Module, cfg: TrainConfig, device: torch.device, total_steps: int):
        self.model = model.to(device)
        if cfg.activation_checkpointing:
            enable_activation_checkpointing(self.model)
        self.cfg = cfg
        self.device = device
        self.total_steps = total_steps
        self.step = 0  # local steps taken so far (drives the schedule)
        self.optimizer_impl = "plain"  # set by _new_optimizer: fused, foreach or plain
        self.optimizer = self._new_optimizer()
        self.amp_dtype = autocast_dtype(cfg.autocast, device)  # None: no autocast
        self._runner: StepRunner | None = None  # built at the first `train` (DP-SGD never needs it)

    def state_dict(self) -> dict[str, Any]:
        """The optimizer's moments and the schedule's step (what carries across rounds)."""
        return {"optimizer": self.optimizer.state_dict(), "step": self.step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        keep_impl(self.optimizer, self.optimizer_impl)  # this config's kernel, whatever saved the state
        self.step = int(state["step"])

    def _new_optimizer(self) -> torch.optim.Optimizer:
        groups = decay_groups((p for p in self.model.parameters() if p.requires_grad), self.cfg.weight_decay)
        optimizer, self.optimizer_impl = make_adamw(groups, self.cfg.lr, self.cfg.betas, self.cfg.optimizer_impl)
        return optimizer

    @property
    def runner(self) -> StepRunner:
        """Runs forward + backward, through torch.compile when `train.compile` says so."""
        if self._runner is None:
            self._runner = StepRunner(self.model, compile_enabled(self.cfg.compile, self.device))
        return self._runner

    def _forward_backward(self, forward: Callable, batch: torch.Tensor, prox: Callable | None) -> torch.Tensor:
        """Zero the gradients, then the loss of `batch` through `forward` (under autocast when
        on) plus the proximal term `prox()`, backward; returns the loss (without the term)."""
        self.optimizer.zero_grad(set_to_none=True)
        with autocast(self.device, self.amp_dtype):
            loss, _ = lm_loss(forward, batch)
        objective = loss if prox is None else loss + prox()
        objective.backward()
        return loss

    def train(
        self,
        tokens: np.ndarray,
        steps: int,
        rng: np.random.Generator,
        prox_mu: float = 0.0,
        on_step: Callable[[int, float], None] | None = None,
        sample: Callable[[np.random.Generator], torch.Tensor] | None = None,
    ) -> TrainStats:
        """`steps` AdamW steps; with `prox_mu` > 0 adds FedProx's mu/2 ||theta - theta_start||^2.

        Batches are random windows of `tokens`, or whatever `sample(rng)` returns."""
        if self.cfg.optimizer_state == "reset":
            self.optimizer = self._new_optimizer()
        self.model.train()
        trainable = [p for p in self.model.parameters() if p.requires_grad]  # LoRA: the adapter only
        anchor = [p.detach().clone() for p in trainable] if prox_mu > 0 else None
        prox = None
        if anchor is not None:
            prox = lambda: 0.5 * prox_mu * sum((p - a).pow(2).sum() for p, a in zip(trainable, anchor))  # noqa: E731
        runner = self.runner
        losses: list[torch.Tensor] = []
        start = time.perf_counter()
        for i in range(steps):
            lr = lr_at(self.step, self.total_steps, self.cfg)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            if sample is None:
                batch = sample_windows(tokens, self.cfg.batch_size, self.cfg.seq_len, rng)
            else:
                batch = sample(rng)
            batch = batch.to(self.device)
            loss = runner.run(lambda forward: self._forward_backward(forward, batch, prox))
            if self.cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(trainable, self.cfg.grad_clip)
            self.optimizer.step()
            self.step += 1
            losses.append(loss.detach())
            if on_step is not None:
                on_step(i + 1, loss.item())
        self.optimizer.zero_grad(set_to_none=True)  # the gradients are not needed between tasks
        values = torch.stack(losses).float().tolist()  # one read from the device, not one per step
        seconds = time.perf_counter() - start
        tokens_seen = steps * batch.size(0) * (batch.size(1) - 1)
        return TrainStats(steps, tokens_seen, float(np.mean(values)), values[-1], seconds)


def eval_windows(num_tokens: int, seq_len: int, max_windows: int | None) -> np.ndarray:
    """Start offsets of non-overlapping windows, evenly spread over the split."""
    n_all = max(1, (num_tokens - 1) // seq_len)
    if max_windows is None or max_windows >= n_all:
        return np.arange(n_all) * seq_len
    return np.linspace(0, n_all - 1, max_windows).round().astype(np.int64) * seq_len


def eval_window_budget(seq_len: int, batch_size: int, max_batches: int | None, max_tokens: int | None) -> int | None:
    """How many windows of `seq_len` predicted tokens an evaluation may use: at most
    `max_batches` batches and at most `max_tokens` tokens (at least one window); None = all."""
    caps = []
    if max_batches is not None:
        caps.append(max_batches * batch_size)
    if max_tokens is not None:
        caps.append(max(1, max_tokens // seq_len))
    return min(caps) if caps else None


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    tokens: np.ndarray,
    seq_len: int,
    batch_size: int,
    device: torch.device,
    max_batches: int | None = None,
    max_tokens: int | None = None,
) -> EvalResult:
    """Mean loss, perplexity and next-token top-1 accuracy on fixed windows, evenly spread
    over `tokens`: all of them, or as many as `eval_window_budget` allows."""
    was_training = model.training
    model.eval()
    seq_len = min(seq_len, len(tokens) - 1)
    starts = eval_windows(len(tokens), seq_len, eval_window_budget(seq_len, batch_size, max_batches, max_tokens))
    total_loss, correct, count = 0.0, 0, 0
    for b in range(0, len(starts), batch_size):
        idx = starts[b : b + batch_size, None] + np.arange(seq_len + 1)[None, :]
        batch = torch.from_numpy(np.asarray(tokens[idx], dtype=np.int64)).to(device)
        loss, logits = lm_loss(model, batch)
        n = batch[:, 1:].numel()
        total_loss += loss.item() * n
        correct += int((logits.argmax(-1) == batch[:, 1:]).sum())
        count += n
    model.train(was_training)
    mean = total_loss / count
    return EvalResult(mean, math.exp(min(mean, 50.0)), correct / count, count)


def unigram_perplexity(train_tokens: np.ndarray, valid_tokens: np.ndarray, vocab_size: int) -> float:
    """Perplexity on `valid_tokens` of the add-one smoothed unigram model of `train_tokens`."""
    counts = np.bincount(np.asarray(train_tokens), minlength=vocab_size).astype(np.float64) + 1.0
    logp = np.log(counts / counts.sum())
    return float(np.exp(-logp[np.asarray(valid_tokens)].mean()))
