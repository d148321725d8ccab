"""Gradient-based aggregation: the averaged pseudo-gradient drives a server optimizer.

Each client sends delta_i = theta_start - theta_end (its pseudo-gradient). The server
puts the token-weighted mean of the deltas (folded as updates arrive, `mean.py`) into
`.grad` of its own copy of the global parameters and calls a real `torch.optim`
optimizer step, as torchft's DiLoCo does.
With SGD, lr = 1 and no momentum this is exactly FedAvg.

Named configurations (each its own registry entry, parameters still overridable):
  fedopt      any of sgd | nesterov | adam | yogi | adagrad (Reddi et al. 2021)
  diloco      Nesterov SGD, lr 0.7, momentum 0.9 (Douillard et al. 2023)
  fedavgm     SGD with server momentum 0.9, lr 1 - momentum (Hsu et al. 2019)
  fedadam / fedyogi / fedadagrad   Reddi et al. 2021's adaptive server optimizers

Notes. `fedsgd` asks clients for raw gradients (`send: gradient`,
see `skyfed.federation.fedsgd`) and steps with SGD, or with the local trainer's AdamW
and schedule (`optimizer: adamw`: the `sync` baseline's step). `adam` is `torch.optim.Adam`, which (unlike Reddi et al.'s Algorithm 2) applies
bias correction; `adagrad` is `torch.optim.Adagrad` (no first moment); `yogi` follows
Algorithm 2 (see `yogi.py`). With `train.local_steps=1`, `fedopt` gets one local
AdamW step per client as its pseudo-gradient; `fedsgd` gets the gradient itself.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch

from skyfed.errors import CheckpointError
from skyfed.federation.messages import Update
from skyfed.federation.strategies.base import AggregateResult, Params
from skyfed.federation.strategies.mean import MeanStrategy
from skyfed.federation.strategies.params import bad, choice, flag, number, pair
from skyfed.federation.strategies.yogi import Yogi
from skyfed.optim import decay_groups, make_adamw
from skyfed.train import lr_at

OPTIMIZERS = ("sgd", "nesterov", "adam", "yogi", "adagrad")


class FedOpt(MeanStrategy):
    """Server optimizer on the averaged pseudo-gradient.

    Reddi et al. 2021, "Adaptive Federated Optimization", ICLR, arXiv:2003.00295;
    the outer step as in DiLoCo (Douillard et al. 2023, arXiv:2311.08105).
    """

    name = "fedopt"
    description = "server optimizer (sgd|nesterov|adam|yogi|adagrad) on the mean pseudo-gradient"
    paper = "Reddi et al. 2021, arXiv:2003.00295"

    def __init__(
        self,
        optimizer: str = "sgd",
        lr: float = 1.0,
        momentum: float = 0.0,
        betas: tuple[float, float] | list[float] = (0.9, 0.99),
        eps: float = 1e-3,
        initial_accumulator: float = 0.0,
        use_tokens: bool = True,
    ):
        self.optimizer_name = choice("optimizer", optimizer, OPTIMIZERS)
        self.momentum = number("momentum", momentum, 0.0, 1.0)
        if self.momentum >= 1.0:
            raise bad("momentum", f"must be < 1, got {self.momentum:g}")
        self.lr = number("lr", lr, 0.0, lo_open=True)
        self.betas = pair("betas", betas)
        self.eps = number("eps", eps, 0.0, lo_open=True)
        self.initial_accumulator = number("initial_accumulator", initial_accumulator, 0.0)
        self.use_tokens = flag("use_tokens", use_tokens)
        if self.optimizer_name == "nesterov" and self.momentum == 0.0:
            raise bad("momentum", "nesterov needs momentum > 0")
        self._names: list[str] | None = None
        self._server: list[torch.Tensor] = []
        self._opt: torch.optim.Optimizer | None = None
        self._pending: dict[str, Any] | None = None

    # ---------------------------------------------------------------- optimizer

    def _make_optimizer(self, tensors: list[torch.Tensor]) -> torch.optim.Optimizer:
        kind = self.optimizer_name
        if kind in ("sgd", "nesterov"):
            return torch.optim.SGD(tensors, lr=self.lr, momentum=self.momentum, nesterov=kind == "nesterov")
        if kind == "adam":
            return torch.optim.Adam(tensors, lr=self.lr, betas=self.betas, eps=self.eps)
        if kind == "adagrad":
            return torch.optim.Adagrad(tensors, lr=self.lr, eps=self.eps, initial_accumulator_value=self.initial_accumulator)
        return Yogi(tensors, lr=self.lr, betas=self.betas, eps=self.eps, initial_accumulator=self.initial_accumulator)

    def _ensure(self, global_params: Params) -> None:
        names = list(global_params)
        if self._opt is not None and names == self._names:
            return
        if self._opt is not None:
            raise ValueError(f"{self.name}: the model's parameters changed between rounds")
        self._names = names
        self._server = [global_params[n].detach().to(torch.float32).clone().requires_grad_(True) for n in names]
        self._opt = self._make_optimizer(self._server)
        if self._pending is not None:
            pending, self._pending = self._pending, None
            self.load_state_dict(pending)

    # ---------------------------------------------------------------- strategy

    def weight(self, update: Update) -> float:
        return float(update.num_tokens) if self.use_tokens else 1.0

    def step(self, global_params: Params, mean_delta: Params, weights: dict[str, float], round: int) -> AggregateResult:
        self._ensure(global_params)
        norm = math.sqrt(sum(float(torch.linalg.vector_norm(g.float())) ** 2 for g in mean_delta.values()))
        with torch.no_grad():
            for name, p in zip(self._names, self._server):
                p.copy_(global_params[name])
                p.grad = mean_delta[name].to(torch.float32)  # the mean is ours: no copy
        self._before_step(round)
        self._opt.step()
        self._opt.zero_grad(set_to_none=True)
        new = {name: p.detach().clone() for name, p in zip(self._names, self._server)}
        return AggregateResult(new, {"weights": weights, "pseudo_grad_norm": norm})

    def _before_step(self, round: int) -> None:
        """Called with the mean in `.grad`, before the optimizer steps (schedules, clipping)."""

    def state_dict(self) -> dict[str, Any]:
        if self._opt is None:
            return copy.deepcopy(self._pending) if self._pending is not None else {"optimizer": self.optimizer_name}
        return {"optimizer": self.optimizer_name, "names": list(self._names), "state": copy.deepcopy(self._opt.state_dict())}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("optimizer") != self.optimizer_name:
            raise CheckpointError(
                f"{self.name}: checkpoint holds {state.get('optimizer')!r} server optimizer state, this run uses {self.optimizer_name!r}"
            )
        if "state" not in state:
            return
        if self._opt is None:
            self._pending = copy.deepcopy(state)
            return
        if state["names"] != self._names:
            raise CheckpointError(f"{self.name}: checkpoint's server optimizer state is for other parameters")
        self._opt.load_state_dict(copy.deepcopy(state["state"]))


class DiLoCo(FedOpt):
    """DiLoCo's outer step: Nesterov SGD, lr 0.7, momentum 0.9, on the pseudo-gradient.

    Douillard et al. 2023, "DiLoCo: Distributed Low-Communication Training of Language
    Models", arXiv:2311.08105.
    """

    name = "diloco"
    description = "Nesterov outer SGD (lr 0.7, momentum 0.9) on the mean pseudo-gradient"
    paper = "Douillard et al. 2023, arXiv:2311.08105"

    def __init__(self, lr: float = 0.7, momentum: float = 0.9, use_tokens: bool = True):
        super().__init__("nesterov", lr=lr, momentum=momentum, use_tokens=use_tokens)


class FedAvgM(FedOpt):
    """FedAvg with server momentum: v <- beta v + delta; theta <- theta - lr v.

    Hsu et al. 2019, "Measuring the Effects of Non-Identical Data Distribution for
    Federated Visual Classification", arXiv:1909.06335.
    """

    name = "fedavgm"
    description = "FedAvg with server momentum (SGD, momentum 0.9, lr 1 - momentum)"
    paper = "Hsu et al. 2019, arXiv:1909.06335"

    def __init__(self, lr: float | None = None, momentum: float = 0.9, use_tokens: bool = True):
        # lr defaults to 1 - momentum: an effective server step lr / (1 - momentum) of 1,
        # the FedAvg step once momentum has built up (Hsu et al. discuss this ratio).
        momentum = number("momentum", momentum, 0.0, 1.0)
        super().__init__("sgd", lr=(1.0 - momentum) if lr is None else lr, momentum=momentum, use_tokens=use_tokens)


class FedSGD(FedOpt):
    """FedSGD: clients send the mean gradient of `train.local_steps` batches at the
    global model; the server takes one step with it.

    McMahan et al. 2017, "Communication-Efficient Learning of Deep Networks from
    Decentralized Data", AISTATS, arXiv:1602.05629 (FedSGD).

    `optimizer: sgd` (the default) is SGD at `lr` with `momentum`. `optimizer: adamw` is
    the local trainer's own step run on the server: AdamW at `train.lr` on the warmup +
    cosine schedule over the run's rounds, `train.betas`, `train.weight_decay` on the
    matrices and clipping to `train.grad_clip`. With one batch a client a round and no
    codec, that is the step of the `sync` baseline (synchronous data parallelism).
    """

    name = "fedsgd"
    description = "clients send gradients (no local step); server SGD or AdamW step on their mean"
    paper = "McMahan et al. 2017, arXiv:1602.05629"

    def __init__(self, lr: float | None = None, momentum: float | None = None, optimizer: str = "sgd",
                 use_tokens: bool = True, train_config: Any = None, total_rounds: int | None = None):
        kind = choice("optimizer", optimizer, ("sgd", "adamw"))
        if kind == "adamw":
            for key, value in (("lr", lr), ("momentum", momentum)):
                if value is not None:
                    raise bad(key, "optimizer adamw takes its lr, betas and schedule from the train section")
            if train_config is None or total_rounds is None:
                raise bad("optimizer", "adamw needs the run's train section and round count")
        super().__init__("sgd", lr=0.5 if lr is None else lr, momentum=0.9 if momentum is None else momentum,
                         use_tokens=use_tokens)
        self.optimizer_name = kind
        self.train_config = train_config
        self.total_rounds = total_rounds

    def client_options(self, round: int) -> dict[str, Any]:
        return {"send": "gradient"}

    def _make_optimizer(self, tensors: list[torch.Tensor]) -> torch.optim.Optimizer:
        if self.optimizer_name == "sgd":
            return super()._make_optimizer(tensors)
        tc = self.train_config
        optimizer, _ = make_adamw(decay_groups(tensors, tc.weight_decay), tc.lr, tc.betas, tc.optimizer_impl)
        return optimizer

    def _before_step(self, round: int) -> None:
        if self.optimizer_name == "sgd":
            return
        tc = self.train_config
        for group in self._opt.param_groups:
            group["lr"] = lr_at(round, self.total_rounds, tc)
        if tc.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self._server, tc.grad_clip)


class _Adaptive(FedOpt):
    kind = "adam"

    def __init__(self, lr: float = 0.01, betas: tuple[float, float] | list[float] = (0.9, 0.99), eps: float = 1e-3,
                 initial_accumulator: float = 0.0, use_tokens: bool = True):
        super().__init__(self.kind, lr=lr, betas=betas, eps=eps, initial_accumulator=initial_accumulator,
                         use_tokens=use_tokens)


class FedAdam(_Adaptive):
    """FedAdam: Adam (torch.optim.Adam, bias-corrected) on the mean pseudo-gradient.

    Reddi et al. 2021, "Adaptive Federated Optimization", ICLR, arXiv:2003.00295.
    """

    name = "fedadam"
    description = "Adam server optimizer on the mean pseudo-gradient"
    paper = "Reddi et al. 2021, arXiv:2003.00295"
    kind = "adam"


class FedYogi(_Adaptive):
    """FedYogi: Yogi on the mean pseudo-gradient (Reddi et al. 2021, arXiv:2003.00295)."""

    name = "fedyogi"
    description = "Yogi server optimizer on the mean pseudo-gradient"
    paper = "Reddi et al. 2021, arXiv:2003.00295"
    kind = "yogi"


class FedAdagrad(_Adaptive):
    """FedAdagrad: Adagrad on the mean pseudo-gradient (Reddi et al. 2021, arXiv:2003.00295)."""

    name = "fedadagrad"
    description = "Adagrad server optimizer on the mean pseudo-gradient"
    paper = "Reddi et al. 2021, arXiv:2003.00295"
    kind = "adagrad"

    # Adagrad's steps shrink as 1/sqrt(rounds), so its default server lr is larger than Adam's.
    def __init__(self, lr: float = 0.03, eps: float = 1e-3, initial_accumulator: float = 0.0, use_tokens: bool = True):
        super().__init__(lr=lr, eps=eps, initial_accumulator=initial_accumulator, use_tokens=use_tokens)
