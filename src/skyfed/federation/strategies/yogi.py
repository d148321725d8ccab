"""The Yogi optimizer as a `torch.optim.Optimizer` (torch.optim has none).

Zaheer et al. 2018, "Adaptive Methods for Nonconvex Optimization", NeurIPS; in the
federated server form of Reddi et al. 2021, "Adaptive Federated Optimization", ICLR,
arXiv:2003.00295, Algorithm 2 (FedYogi), without bias correction:

    m <- beta1 m + (1 - beta1) g
    v <- v - (1 - beta2) g^2 sign(v - g^2)
    p <- p - lr m / (sqrt(v) + eps)
"""

from __future__ import annotations

import torch


class Yogi(torch.optim.Optimizer):
    def __init__(self, params, lr: float = 1e-2, betas: tuple[float, float] = (0.9, 0.99), eps: float = 1e-3,
                 initial_accumulator: float = 0.0):
        if lr <= 0 or eps <= 0 or not all(0.0 <= b < 1.0 for b in betas) or initial_accumulator < 0:
            raise ValueError(f"invalid Yogi hyperparameters lr={lr} betas={betas} eps={eps}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, initial_accumulator=initial_accumulator))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.full_like(p, group["initial_accumulator"])
                m, v = state["exp_avg"], state["exp_avg_sq"]
                state["step"] += 1
                m.mul_(beta1).add_(g, alpha=1 - beta1)
                g2 = g * g
                v.sub_((1 - beta2) * g2 * torch.sign(v - g2))
                p.addcdiv_(m, v.sqrt().add_(group["eps"]), value=-group["lr"])
        return loss
