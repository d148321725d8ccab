"""A federated client: receive the global model, train locally, send back the update.

The same class serves the in-process simulation and `skyfed client` over gRPC. It
persists for the whole run, so its optimizer state (and later error-feedback
residuals) carries across rounds.
"""

from __future__ import annotations

import logging
import time
from typing import Callable

import numpy as np
import torch

from skyfed.compression.channel import DownlinkReceiver, Uplink
from skyfed.compression.codecs import mix_seed
from skyfed.compression.wire import TensorSpec
from skyfed.errors import WireFormatError
from skyfed.federation.messages import ClientResult, TrainTask
from skyfed.model import get_params, set_params
from skyfed.train import LocalTrainer, evaluate

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
        privacy=None,  # skyfed.security.client.ClientPrivacy; None = no differential privacy
    ):
        self.name = name
        self.tokens = tokens
        self.privacy = privacy
        self.trainer = trainer if privacy is None else privacy.wrap_trainer(trainer)  # DP-SGD when document-level DP is on
        self.param_names = param_names
        self.seed = seed
        self.max_payload_bytes = max_payload_bytes
        self.spec = {n: TensorSpec(tuple(t.shape), torch.float32) for n, t in get_params(self.trainer.model, param_names).items()}
        self.on_step: StepCallback | None = None
        # Called just before and just after local training: a runtime may put away what
        # training does not need (the model this client holds, before) and what the update
        # does not need (the optimizer's state, after), skyfed.runtime.replica.
        self.before_training: Callable[[], None] | None = None
        self.after_training: Callable[[], None] | None = None
        self.uplink = Uplink.from_config(compression)  # keeps the error-feedback residual
        self.downlink = DownlinkReceiver(get_params(self.trainer.model, param_names))  # the model it holds
        # secure aggregation: a skyfed.security.secagg.participant.SecAggParticipant, set by
        # the runtime when security.secure_aggregation is on; None sends codec-encoded updates
        self.secagg = None
        # exact LoRA aggregation: a skyfed.lora_exact.BaseReceiver, set by the runtime when
        # model.peft.aggregation is exact; it applies the base weights' change a task carries
        self.base = None

    def state_dict(self) -> dict:
        """What this client carries from round to round: optimizer moments and schedule
        step, the error-feedback residual, the model it holds for delta downlinks."""
        feedback = self.uplink.feedback
        return {
            "trainer": self.trainer.state_dict(),
            "residual": feedback.state_dict() if feedback is not None else None,
            "downlink": self.downlink.state_dict(),
            "base": self.base.state_dict() if self.base is not None else None,
        }

    def load_state_dict(self, state: dict) -> None:
        self.trainer.load_state_dict(state["trainer"])
        if self.uplink.feedback is not None and state["residual"] is not None:
            self.uplink.feedback.load_state_dict(state["residual"])
        self.downlink.load_state_dict(state["downlink"])
        if self.base is not None and state.get("base") is not None:
            self.base.load_state_dict(state["base"])

    def drop_state(self) -> None:
        """Let go of this client's state (optimizer moments, gradients, residual, held
        model) once it is kept elsewhere; `load_state_dict` brings it back. The parameter
        tensors stay: the next task overwrites them."""
        self.trainer.optimizer.state.clear()
        self.trainer.model.zero_grad(set_to_none=True)
        if self.uplink.feedback is not None:
            self.uplink.feedback.residual = {}
        self.downlink.held = None

    @property
    def num_tokens(self) -> int:
        return len(self.tokens)

    def split_holdout(self, holdout_tokens: int) -> tuple[np.ndarray, np.ndarray | None]:
        """(training tokens, held-out slice): the last `holdout_tokens` of the shard are
        never trained on when a strategy asks for a holdout score (dynamic weighting).
        The slice is capped at a quarter of the shard and at least two windows long."""
        if holdout_tokens <= 0:
            return self.tokens, None
        window = self.trainer.cfg.seq_len + 1
        n = min(int(holdout_tokens), len(self.tokens) // 4)
        if n < 2 * window:
            return self.tokens, None
        return self.tokens[:-n], self.tokens[-n:]

    def handle(self, task: TrainTask) -> ClientResult:
        """Train on one task; a malformed model payload is reported, not raised."""
        if self.secagg is not None and self.secagg.is_control(task):  # secure aggregation's set-up / unmasking
            return self.secagg.control(task)
        try:
            payload = task.payload
            if self.base is not None:  # exact LoRA: the base weights' change first, then the adapter
                payload = self.base.receive(payload, self.max_payload_bytes, what="global model")
            params = self.downlink.receive(payload, self.spec, self.max_payload_bytes, what="global model")
        except WireFormatError as exc:
            log.error("client %s: rejected the global model of round %d: %s", self.name, task.round, exc)
            return ClientResult(self.name, task.round, task.version, None, error=str(exc))
        rng = np.random.default_rng([self.seed, task.round])
        torch.manual_seed(int(rng.integers(2**31)))
        callback = None
        if self.on_step is not None:
            callback = lambda step, loss: self.on_step(self.name, step, task.steps, loss)  # noqa: E731
        train_tokens, holdout = self.split_holdout(int(task.options.get("holdout_tokens", 0)))
        if task.options.get("send") == "gradient":  # FedSGD: the gradient, not a local step
            set_params(self.trainer.model, params)
            return self._gradient_result(task, params, train_tokens, rng)
        set_params(self.trainer.model, self.uplink.start_point(params))  # global, or global - residual (residual_in_model)
        held = self.downlink.held is params  # the receiver keeps the model: read it from there after training
        if held:
            params = None
        if self.before_training is not None:
            self.before_training()
        stats = self.trainer.train(
            train_tokens, task.steps, rng, prox_mu=float(task.options.get("prox_mu", 0.0)), on_step=callback
        )
        holdout_loss = None
        if holdout is not None:
            cfg = self.trainer.cfg
            holdout_loss = evaluate(self.trainer.model, holdout, cfg.seq_len, cfg.batch_size, self.trainer.device).loss
        if self.after_training is not None:
            self.after_training()
        if held:
            params = self.downlink.held
        end = dict(self.trainer.model.named_parameters())  # read in place: no copy of the model
        delta = {n: params[n] - end[n].detach().to("cpu", torch.float32) for n in self.param_names}  # theta_global - theta_end
        del end
        meta = {}
        if self.privacy is not None:  # clip (+ noise share) before encoding; no loss leaves the client
            delta = self.privacy.privatize(delta)
            meta = self.privacy.report(self.trainer)
            stats.loss_mean, holdout_loss = float("nan"), None
        if self.secagg is not None and "secagg" in task.options:  # the masked ring vector instead
            payload = self.secagg.masked_payload(task, delta, stats.tokens)
        else:
            payload = self.uplink.encode(
                delta, mix_seed(self.seed, task.round), from_start_point=True, consume=True,
                kind="update", round=task.round, client=self.name, base_version=task.version,
            )
        return ClientResult(
            client=self.name,
            round=task.round,
            base_version=task.version,
            payload=payload,
            num_tokens=stats.tokens,
            train_loss=stats.loss_mean,
            holdout_loss=holdout_loss,
            compute_s=stats.seconds,
            meta=meta,
        )

    def _gradient_result(self, task: TrainTask, params, tokens: np.ndarray, rng: np.random.Generator) -> ClientResult:
        from skyfed.federation.fedsgd import local_gradient

        started = time.perf_counter()
        grads, loss, used = local_gradient(self.trainer, tokens, task.steps, rng, self.param_names)
        if self.privacy is not None:  # client-level DP clips the gradient it sends
            grads, loss = self.privacy.privatize(grads), float("nan")
        if self.secagg is not None and "secagg" in task.options:
            payload = self.secagg.masked_payload(task, grads, used)
        else:
            payload = self.uplink.encode(
                grads, mix_seed(self.seed, task.round), kind="update", round=task.round, client=self.name,
                base_version=task.version,
            )
        return ClientResult(self.name, task.round, task.version, payload, num_tokens=used, train_loss=loss,
                            compute_s=time.perf_counter() - started)
