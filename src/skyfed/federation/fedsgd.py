"""FedSGD's client side: the mean loss gradient at the received model, no local step.

McMahan et al. 2017, "Communication-Efficient Learning of Deep Networks from
Decentralized Data", AISTATS, arXiv:1602.05629 (the FedSGD baseline). A client asked
for `send: gradient` returns g = mean over `steps` batches of grad L(theta_start) as its
delta; the server's optimizer (the `fedsgd` strategy) then takes the actual step, so
`theta - lr * g` is one step of large-batch SGD over all clients' data.
"""

from __future__ import annotations

import numpy as np
import torch

from skyfed.train import LocalTrainer, lm_loss, sample_windows


def local_gradient(
    trainer: LocalTrainer, tokens: np.ndarray, batches: int, rng: np.random.Generator, names: list[str]
) -> tuple[dict[str, torch.Tensor], float, int]:
    """(mean gradient per named parameter, mean loss, tokens used) over `batches` batches."""
    model = trainer.model
    model.train()
    params = dict(model.named_parameters())
    model.zero_grad(set_to_none=True)
    losses = []
    for _ in range(batches):
        batch = sample_windows(tokens, trainer.cfg.batch_size, trainer.cfg.seq_len, rng).to(trainer.device)
        loss, _ = lm_loss(model, batch)
        (loss / batches).backward()
        losses.append(loss.item())
    grads = {}
    for n in names:
        g = params[n].grad
        grads[n] = torch.zeros_like(params[n], device="cpu", dtype=torch.float32) if g is None else g.detach().to("cpu", torch.float32).clone()
    model.zero_grad(set_to_none=True)
    return grads, float(np.mean(losses)), batches * trainer.cfg.batch_size * trainer.cfg.seq_len
