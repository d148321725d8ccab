"""Document-level DP-SGD inside one cloud, with opacus.

Abadi et al. 2016, "Deep Learning with Differential Privacy", CCS, arXiv:1607.00133.
Each step draws a Poisson sample of the client's training windows (each window with
probability q = batch_size / windows), computes one gradient per window (opacus'
`GradSampleModule`), clips each to L2 norm `max_grad_norm`, adds N(0, sigma^2 *
max_grad_norm^2) to their sum and divides by the expected batch size (opacus'
`DPOptimizer`), then takes the AdamW step. The unit of privacy is one window.

Unit `window`: the client's tokens cut into DISJOINT windows of `seq_len + 1` tokens
(every token in exactly one window; the plain trainer's overlapping random windows would
put each token in up to seq_len + 1 samples). A document of L tokens touches at most
ceil(L / (seq_len + 1)) + 1 windows, so its guarantee is group privacy over that many
windows; `max_windows_per_document` reports the largest such count in the shard.

Unit `document`: the samples are the documents (each ends with EOS). A step takes each
document with probability q = batch_size / documents, and a sampled document
contributes ONE window drawn uniformly inside it (a document shorter than a window is
padded, its padding ignored by the loss), clipped like any sample: adding or removing a
document changes the step's sum by at most max_grad_norm, so epsilon is per document.

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


def document_spans(tokens: np.ndarray, eos_id: int | None) -> np.ndarray:
    """(documents, 2) array of [start, end) of each document (ended by `eos_id`, or by the
    end of the shard)."""
    n = len(tokens)
    ends = np.flatnonzero(np.asarray(tokens) == eos_id) + 1 if eos_id is not None else np.zeros(0, dtype=np.int64)
    if len(ends) == 0 or ends[-1] != n:
        ends = np.append(ends, n)
    starts = np.concatenate([[0], ends[:-1]])
    keep = ends - starts >= 2  # at least one next-token pair
    return np.stack([starts[keep], ends[keep]], axis=1)


def document_windows(
    tokens: np.ndarray, spans: np.ndarray, width: int, pad_id: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """One window of `width` tokens drawn uniformly inside each span (padded with `pad_id`
    when the document is shorter), and each window's number of real tokens."""
    out = np.full((len(spans), width), pad_id, dtype=np.int64)
    lengths = np.minimum(spans[:, 1] - spans[:, 0], width)
    room = spans[:, 1] - spans[:, 0] - lengths  # how far the window may start into the document
    starts = spans[:, 0] + (rng.random(len(spans)) * (room + 1)).astype(np.int64)
    for i, (s, k) in enumerate(zip(starts, lengths)):
        out[i, :k] = tokens[s : s + k]
    return out, lengths


def window_loss(model: torch.nn.Module, batch: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
    """The mean over windows of each window's mean next-token cross-entropy (a window of
    `lengths[i]` real tokens scores its first lengths[i] - 1 predictions only), so each
    window's gradient depends on that window alone. Position ids are passed with the
    batch dimension: opacus needs every input of a layer to carry it (GPT-2's position
    embedding otherwise sees a batch of one)."""
    inputs = batch[:, :-1]
    positions = torch.arange(inputs.size(1), device=inputs.device).expand_as(inputs)
    logits = model(input_ids=inputs, position_ids=positions).logits
    per_token = F.cross_entropy(logits.transpose(1, 2).float(), batch[:, 1:], reduction="none")
    if lengths is None:
        return per_token.mean()
    mask = (torch.arange(per_token.size(1), device=per_token.device)[None, :] < (lengths[:, None] - 1)).float()
    return ((per_token * mask).sum(1) / mask.sum(1)).mean()


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
        self.num_samples = 0
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
        eos = getattr(self.model.config, "eos_token_id", None)
        by_document = self.dp.unit == "document"
        if by_document:
            spans = document_spans(tokens, eos)
            n = len(spans)
            self.group_size = 1
        else:
            windows = disjoint_windows(tokens, self.cfg.seq_len)
            n = len(windows)
            self.group_size = max_windows_per_document(tokens, self.cfg.seq_len, eos)
        if n < 1:
            raise ValueError("no document of two tokens or more in the shard")
        q = min(1.0, self.cfg.batch_size / n)
        self.sample_rate, self.num_samples = q, n
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
                lengths = None
                if by_document:
                    rows, lengths = document_windows(tokens, spans[picked], self.cfg.seq_len + 1, eos or 0, self.sampler)
                    lengths = torch.from_numpy(lengths).to(self.device)
                else:
                    rows = windows[picked]
                batch = torch.from_numpy(np.asarray(rows, dtype=np.int64)).to(self.device)
                loss = window_loss(self.gsm, batch, lengths)
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
            "unit": self.dp.unit,
            "windows" if self.dp.unit == "window" else "documents": self.num_samples,
            "max_windows_per_document": self.group_size,
            "accountant": self.accountant,
        }
