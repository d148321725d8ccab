"""What a `FederatedClient` does for privacy, built from the experiment config it holds
(in simulation from the run's config, over gRPC from the config the server sends)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from skyfed.config import DocumentDPConfig, ExperimentConfig
from skyfed.security.dp import ClientDP, Params, cohort_size


@dataclass
class ClientPrivacy:
    update: ClientDP | None  # client-level DP: clip (and the distributed noise share)
    document: DocumentDPConfig | None  # document-level DP-SGD in local training
    delta: float
    accountant: str

    def wrap_trainer(self, trainer):
        """The trainer itself, or a DP-SGD trainer over the same model (document-level DP)."""
        if self.document is None:
            return trainer
        from skyfed.security.dpsgd import DPSGDTrainer

        return DPSGDTrainer(trainer, self.document, self.document.delta or self.delta, self.accountant)

    def privatize(self, update: Params) -> Params:
        return update if self.update is None else self.update.privatize(update)

    def report(self, trainer) -> dict[str, Any]:
        """ClientResult.meta entries: the document-level privacy spent so far."""
        return {"dp_document": trainer.report()} if hasattr(trainer, "report") else {}


def client_privacy(cfg: ExperimentConfig) -> ClientPrivacy | None:
    """The client's privacy settings, or None when DP is off."""
    dp = cfg.security.dp
    if not dp.client_level and dp.document is None:
        return None
    update = None
    if dp.client_level:
        fed = cfg.federation
        n = cohort_size(len(fed.clients), fed.fraction, fed.min_clients)
        share = dp.noise_multiplier * dp.clip / math.sqrt(n) if dp.noise == "distributed" else 0.0
        update = ClientDP(dp.clip, share)
    return ClientPrivacy(update, dp.document, dp.delta, dp.accountant)
