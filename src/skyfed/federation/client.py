"""A federated client: receive the global model, train locally, send back the update.

The same class serves the in-process simulation and `skyfed client` over gRPC. It
persists for the whole run, so its optimizer state (and later error-feedback
residuals) carries across rounds.
"""

from __future__ import annotations

import logging
from typing import Callable

import numpy as np
import torch

from skyfed.compression.channel import DownlinkReceiver, Uplink
from skyfed.compression.codecs import mix_seed
from skyfed.compression.wire import TensorSpec
from skyfed.errors import WireFormatError
from skyfed.federation.messages import ClientResult, TrainTask
from skyfed.model import get_params, set_params
from skyfed.train import LocalTrainer

log = logging.getLogger(__name__)

StepCallback = Callable[[str, int, int, float], None]  # client, step, steps, loss


class FederatedClient:
    def __init__(
        self,
        name: str,
        tokens: np.ndarray,
        trainer: LocalTrainer,
        param_names: list[str],
        seed: int,
        max_payload_bytes: int | None = None,
        compression=None,  # skyfed.config.CompressionConfig; None = plain fp32 both ways
    ):
        self.name = name
        self.tokens = tokens
        self.trainer = trainer
        self.param_names = param_names
        self.seed = seed
        self.max_payload_bytes = max_payload_bytes
        self.spec = {n: TensorSpec(tuple(t.shape), torch.float32) for n, t in get_params(trainer.model, param_names).items()}
        self.on_step: StepCallback | None = None
        self.uplink = Uplink.from_config(compression)  # keeps the error-feedback residual
        self.downlink = DownlinkReceiver(get_params(trainer.model, param_names))  # the model it holds

    @property
    def num_tokens(self) -> int:
        return len(self.tokens)

    def handle(self, task: TrainTask) -> ClientResult:
        """Train on one task; a malformed model payload is reported, not raised."""
        try:
            params = self.downlink.receive(task.payload, self.spec, self.max_payload_bytes, what="global model")
        except WireFormatError as exc:
            log.error("client %s: rejected the global model of round %d: %s", self.name, task.round, exc)
            return ClientResult(self.name, task.round, task.version, None, error=str(exc))
        set_params(self.trainer.model, params)
        rng = np.random.default_rng([self.seed, task.round])
        torch.manual_seed(int(rng.integers(2**31)))
        callback = None
        if self.on_step is not None:
            callback = lambda step, loss: self.on_step(self.name, step, task.steps, loss)  # noqa: E731
        stats = self.trainer.train(
            self.tokens, task.steps, rng, prox_mu=float(task.options.get("prox_mu", 0.0)), on_step=callback
        )
        end = get_params(self.trainer.model, self.param_names)
        delta = {n: params[n] - end[n] for n in self.param_names}  # theta_start - theta_end
        payload = self.uplink.encode(
            delta, mix_seed(self.seed, task.round), kind="update", round=task.round, client=self.name, base_version=task.version
        )
        return ClientResult(
            client=self.name,
            round=task.round,
            base_version=task.version,
            payload=payload,
            num_tokens=stats.tokens,
            train_loss=stats.loss_mean,
            compute_s=stats.seconds,
        )
