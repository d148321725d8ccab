"""Document-level DP-SGD inside one cloud, with opacus.

Abadi et al. 2016, "Deep Learning with Differential Privacy", CCS, arXiv:1607.00133.
Each step draws a Poisson sample of the client's training windows (each window with
probability q = batch_size / windows), computes one gradient per window (opacus'
`GradSampleModule`), clips each to L2 norm `max_grad_norm`, adds N(0, sigma^2 *
max_grad_norm^2) to their sum and divides by the expected batch size (opacus'
`DPOptimizer`), then takes the AdamW step. The unit of privacy is one window.

Windows: the client's tokens cut into DISJOINT windows of `seq_len + 1` tokens (every
token in exactly one window; the plain trainer's overlapping random windows would put
each token in up to seq_len + 1 samples). A document of L tokens touches at most
ceil(L / (seq_len + 1)) + 1 windows, so its guarantee is group privacy over that many
windows; `max_windows_per_document` reports the largest such count in the shard.

The sampling and the noise use generators seeded by the operating system, not the
experiment seed: amplification by sampling needs the sample to be secret.
"""

from __future__ import annotations

import logging
import secrets
import time
import warnings
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from skyfed.config import DocumentDPConfig
from skyfed.security.accounting import StepLedger, epsilon
from skyfed.security.dp import secret_generator
from skyfed.train import LocalTrainer, TrainStats, lr_at

log = logging.getLogger(__name__)


def disjoint_windows(tokens: np.ndarray, seq_len: int) -> np.ndarray:
    """A (windows, seq_len + 1) view of `tokens` cut into disjoint windows (the tail that
    does not fill a window is left out)."""
    width = seq_len + 1
    n = len(tokens) // width
    if n < 1:
        raise ValueError(f"shard of {len(tokens)} tokens is shorter than one window of {width}")
    return np.asarray(tokens[: n * width]).reshape(n, width)


def max_windows_per_document(tokens: np.ndarray, seq_len: int, eos_id: int | None) -> int:
    """The most disjoint windows any one document (ended by `eos_id`) touches."""
    width = seq_len + 1
    used = (len(tokens) // width) * width
    if used == 0:
        return 0
    if eos_id is None:
        return used // width
    ends = np.flatnonzero(np.asarray(tokens[:used]) == eos_id)
    if len(ends) == 0 or ends[-1] != used - 1:
        ends = np.append(ends, used - 1)
    starts = np.concatenate([[0], ends[:-1] + 1])
    return int((ends // width - starts // width + 1).max())


def window_loss(model: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of a batch of windows. Position ids are passed with
    the batch dimension: opacus needs every input of a layer to carry it (GPT-2's
    position embedding otherwise sees a batch of one)."""
    inputs = batch[:, :-1]
    positions = torch.arange(inputs.size(1), device=inputs.device).expand_as(inputs)
    logits = model(input_ids=inputs, position_ids=positions).logits
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), batch[:, 1:].reshape(-1))


class DPSGDTrainer(LocalTrainer):
    """A LocalTrainer whose steps are DP-SGD steps; it keeps the privacy ledger of its client."""

    def __init__(self, trainer: LocalTrainer, dp: DocumentDPConfig, delta: float, accountant: str = "rdp"):
        from opacus.grad_sample.utils import prepare_module

        self.dp = dp
        self.delta = delta
        self.accountant = accountant
        self.noise_generator = secret_generator()
        self.sampler = np.random.default_rng(secrets.randbits(128))
        super().__init__(trainer.model, trainer.cfg, trainer.device, trainer.total_steps)
        self.step = trainer.step
        self.gsm = prepare_module(self.model, dp.grad_sample_mode, batch_first=True, loss_reduction="mean")
        self.ledger = StepLedger()
        self.sample_rate = 0.0
        self.num_windows = 0
        self.group_size = 0
        self.last_steps = 0  # DP-SGD steps behind the latest update

    def _new_optimizer(self) -> torch.optim.Optimizer:
        from opacus.optimizers import DPOptimizer

        return DPOptimizer(
            super()._new_optimizer(),
            noise_multiplier=self.dp.noise_multiplier,
            max_grad_norm=self.dp.max_grad_norm,
            expected_batch_size=self.cfg.batch_size,
            loss_reduction="mean",
            generator=self.noise_generator,
        )

    def train(
        self,
        tokens: np.ndarray,
        steps: int,
        rng: np.random.Generator,
        prox_mu: float = 0.0,
        on_step: Callable[[int, float], None] | None = None,
        sample: Callable[[np.random.Generator], torch.Tensor] | None = None,
    ) -> TrainStats:
        """`steps` DP-SGD steps on Poisson samples of disjoint windows (`rng` is not used:
        the sample must be secret). FedProx's proximal gradient, which does not touch
        the data, is added after the noise."""
        if sample is not None:
            raise ValueError("DP-SGD draws its own Poisson samples of windows")
        if self.cfg.optimizer_state == "reset":
            self.optimizer = self._new_optimizer()
        windows = disjoint_windows(tokens, self.cfg.seq_len)
        n = len(windows)
        q = min(1.0, self.cfg.batch_size / n)
        self.sample_rate, self.num_windows = q, n
        self.group_size = max_windows_per_document(tokens, self.cfg.seq_len, getattr(self.model.config, "eos_token_id", None))
        params = [p for p in self.model.parameters() if p.requires_grad]
        anchor = [p.detach().clone() for p in params] if prox_mu > 0 else None
        self.gsm.train()
        losses: list[float] = []
        start = time.perf_counter()
        for i in range(steps):
            lr = lr_at(self.step, self.total_steps, self.cfg)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            picked = np.flatnonzero(self.sampler.random(n) < q)
            self.optimizer.zero_grad(set_to_none=True)
            if len(picked):
                batch = torch.from_numpy(np.asarray(windows[picked], dtype=np.int64)).to(self.device)
                loss = window_loss(self.gsm, batch)
                with warnings.catch_warnings():  # token ids need no gradient; opacus' hooks say so every step
                    warnings.filterwarnings("ignore", message="Full backward hook is firing")
                    loss.backward()
                losses.append(loss.item())
            else:  # an empty Poisson sample: the step is noise alone
                for p in params:
                    p.grad_sample = torch.zeros((0, *p.shape), device=p.device, dtype=p.dtype)
                losses.append(float("nan"))
            if self.optimizer.pre_step():  # clip per window, add noise, scale
                if anchor is not None:
                    with torch.no_grad():
                        for p, a in zip(params, anchor):
                            p.grad.add_(p.detach() - a, alpha=prox_mu)
                self.optimizer.original_optimizer.step()
            self.step += 1
            self.ledger.add(q, self.dp.noise_multiplier)
            if on_step is not None:
                on_step(i + 1, losses[-1])
        self.last_steps = steps
        seconds = time.perf_counter() - start
        expected_tokens = steps * self.cfg.batch_size * self.cfg.seq_len  # public: not the sampled count
        finite = [x for x in losses if x == x]
        mean = float(np.mean(finite)) if finite else float("nan")
        return TrainStats(steps, expected_tokens, mean, losses[-1] if losses else float("nan"), seconds)

    def epsilon(self) -> float:
        return epsilon(self.ledger.runs(), self.delta, self.accountant)

    def report(self) -> dict:
        """The DP-SGD steps behind the latest update (for the server's per-client ledger,
        in ClientResult.meta) and this client's own epsilon so far."""
        return {
            "steps": self.last_steps,
            "epsilon_local": self.epsilon(),
            "steps_total": self.ledger.steps,
            "delta": self.delta,
            "sample_rate": self.sample_rate,
            "noise_multiplier": self.dp.noise_multiplier,
            "max_grad_norm": self.dp.max_grad_norm,
            "windows": self.num_windows,
            "max_windows_per_document": self.group_size,
            "accountant": self.accountant,
        }
