"""The client half of secure aggregation as it rides a skyfed transport.

The server sends control tasks (`TrainTask.options["secagg"]["stage"]` is "keys",
"shares" or "unmask", `steps` 0, the server's message framed in `payload`); the client
answers each without training, with its message framed in `ClientResult.payload`.
The training task carries ``options["secagg"] = {"stage": "mask", "bundle": ...,
"max_tokens": N}``; after training the client sends, instead of a codec-encoded
update, its clipped, weighted (w = tokens / N), fixed-point, masked ring vector
(`payload.pack_masked`). A `FederatedClient` needs two lines to use it:

    if self.secagg is not None and self.secagg.is_control(task):
        return self.secagg.control(task)
    ...
    payload = self.secagg.masked_payload(task, delta, stats.tokens) if self.secagg ... else self.uplink.encode(...)
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from skyfed.compression.wire import TensorSpec
from skyfed.errors import SecAggError
from skyfed.federation.messages import ClientResult, TrainTask
from skyfed.security.secagg.client import SecAggClient
from skyfed.security.secagg.crypto import b64d
from skyfed.security.secagg.encoding import SecAggSettings, UpdateEncoder
from skyfed.security.secagg.messages import pack_control, unpack_control
from skyfed.security.secagg.payload import pack_masked

log = logging.getLogger(__name__)


class SecAggParticipant:
    def __init__(self, name: str, spec: dict[str, TensorSpec], settings: SecAggSettings, seed: int = 0):
        self.name = name
        self.spec = spec
        self.settings = settings
        self.seed = seed
        self._sessions: dict[int, tuple[SecAggClient, UpdateEncoder]] = {}  # round -> this round's protocol state

    @staticmethod
    def is_control(task: TrainTask) -> bool:
        info = task.options.get("secagg")
        return isinstance(info, dict) and info.get("stage") in ("keys", "shares", "unmask")

    def control(self, task: TrainTask) -> ClientResult:
        """Answer one control task; a protocol failure is reported as the result's error."""
        stage = task.options["secagg"]["stage"]
        try:
            body = unpack_control(task.payload, stage, task.round)
            if stage == "keys":
                encoder = UpdateEncoder(self.spec, self.settings, int(body["clients"]))
                client = SecAggClient(self.name, encoder.params())
                self._sessions = {task.round: (client, encoder)}  # a new round forgets the old one
                reply = client.advertise()
            elif stage == "shares":
                reply = self._session(task.round)[0].share_keys(body)
            else:
                reply = self._session(task.round)[0].unmask(body)
        except (SecAggError, KeyError, TypeError, ValueError) as exc:
            log.error("client %s: secure aggregation %s stage of round %d failed: %s", self.name, stage, task.round, exc)
            return ClientResult(self.name, task.round, task.version, None, error=f"secure aggregation: {exc}",
                                meta={"secagg_stage": stage})
        return ClientResult(self.name, task.round, task.version, pack_control(stage, task.round, reply, client=self.name),
                            meta={"secagg_stage": stage})

    def _session(self, round: int) -> tuple[SecAggClient, UpdateEncoder]:
        if round not in self._sessions:
            raise SecAggError(f"secure aggregation: client {self.name!r} has no session for round {round}")
        return self._sessions[round]

    @classmethod
    def for_config(cls, name: str, spec: dict[str, TensorSpec], cfg) -> "SecAggParticipant | None":
        """The participant a client needs under `cfg` (an ExperimentConfig), or None."""
        if not cfg.security.secure_aggregation:
            return None
        from skyfed.security.secagg.simulated import settings_from_config

        return cls(name, spec, settings_from_config(cfg.security.secagg), seed=cfg.seed)

    def masked_payload(self, task: TrainTask, delta: dict[str, torch.Tensor], tokens: int) -> bytes:
        """The masked ring vector of `delta` for the training task of a secure round."""
        info = task.options["secagg"]
        client, encoder = self._session(task.round)
        max_tokens = int(info["max_tokens"])
        weight = min(1.0, max(tokens, 1) / max_tokens) if max_tokens > 0 else 1.0
        rng = np.random.default_rng([self.seed, task.round, 7])
        masked = client.mask(info["bundle"], encoder.encode(delta, weight, rng))
        session = b64d(info["bundle"]["session"], "session id")
        return pack_masked(masked, encoder.params(), session, weight, kind="update", round=task.round,
                           client=self.name, base_version=task.version)
