"""Differential privacy, assembled: config checks, the server-side wrapper and the
accountant that writes epsilon to every metrics.jsonl line and to the summary.

    security:
      dp:
        clip: 0.5               # client-level DP-FedAvg (McMahan et al. 2018)
        noise_multiplier: 1.0
        delta: 1.0e-5
        noise: server           # or distributed (each client adds its share)
        document:               # DP-SGD inside each cloud (opacus)
          noise_multiplier: 1.0
          max_grad_norm: 1.0

`apply_privacy(cfg, strategy, observers)` is the one call a runtime makes; clients get
their half through `skyfed.security.client.client_privacy(cfg)`. See docs/security.md.
"""

from __future__ import annotations

import importlib.util
import logging
from typing import Any

from skyfed.config import ExperimentConfig
from skyfed.errors import ConfigError
from skyfed.federation.strategies import STRATEGIES, Strategy
from skyfed.federation.strategies.dynamic import DynamicWeighted
from skyfed.federation.strategies.fedopt import FedSGD
from skyfed.federation.strategies.mean import MeanStrategy
from skyfed.security.accounting import StepLedger, epsilon
from skyfed.security.dp import cohort_size
from skyfed.security.dp_strategy import DPMean

log = logging.getLogger(__name__)


def check_privacy(cfg: ExperimentConfig) -> None:
    """Refuse, with one ConfigError line, DP settings that cannot hold their guarantee."""
    dp = cfg.security.dp
    for module, needed in (("dp_accounting", True), ("opacus", dp.document is not None)):
        if needed and importlib.util.find_spec(module) is None:
            raise ConfigError(f"security.dp needs {module}: pip install 'skyfed[privacy]'")
    name = cfg.federation.strategy.name
    cls = STRATEGIES.get(name)
    if dp.client_level and cls is not None:
        if not issubclass(cls, MeanStrategy) or issubclass(cls, DynamicWeighted):
            raise ConfigError(
                f"security.dp: client-level DP needs a synchronous weighted-mean strategy "
                f"(fedavg, fedprox or the FedOpt family); {name!r} weights or uses individual updates"
            )
        if dp.noise == "distributed" and cfg.compression.uplink:
            raise ConfigError(
                "security.dp.noise: distributed noise needs the plain fp32 uplink (compression.uplink: []): "
                "a lossy codec with error feedback changes the noised update the sum relies on"
            )
    if dp.document is not None and cls is not None and issubclass(cls, FedSGD):
        raise ConfigError("security.dp.document: DP-SGD needs local training steps; fedsgd sends raw gradients")


def apply_privacy(cfg: ExperimentConfig, strategy: Strategy, observers: list[Any]) -> Strategy:
    """The strategy to run (wrapped for client-level DP) and, appended to `observers`,
    the accountant that reports epsilon; the strategy unchanged when DP is off."""
    dp = cfg.security.dp
    if not dp.client_level and dp.document is None:
        return strategy
    check_privacy(cfg)
    fed = cfg.federation
    cohort = cohort_size(len(fed.clients), fed.fraction, fed.min_clients)
    if dp.client_level:
        if not isinstance(strategy, MeanStrategy):
            raise ConfigError(f"security.dp: cannot wrap strategy {strategy.name!r} for client-level DP")
        strategy = DPMean(strategy, dp.clip, dp.noise_multiplier, cohort, dp.noise)
        if cohort < len(fed.clients):
            log.warning(
                "client-level DP: the accountant assumes Poisson sampling at q=%d/%d; skyfed draws a fixed-size "
                "cohort from the experiment seed (docs/security.md, caveats)", cohort, len(fed.clients)
            )
    observers.append(PrivacyAccountant(cfg, cohort))
    return strategy


class PrivacyAccountant:
    """An engine observer: epsilon at delta after each round, from `dp-accounting`.

    Client-level: one subsampled Gaussian release per aggregated round, at q = cohort /
    clients and noise multiplier sigma (with distributed noise sigma * sqrt(m / cohort)
    when only m of the cohort's updates arrived: the missing shares of noise are missing).
    Document-level: a ledger per client of the DP-SGD steps behind every update that
    arrived (each ClientResult.meta says how many, at which q and sigma), so a client
    that restarts does not start its count again at zero."""

    def __init__(self, cfg: ExperimentConfig, cohort: int):
        dp = cfg.security.dp
        self.dp = dp
        self.num_clients = len(cfg.federation.clients)
        self.cohort = cohort
        self.ledger = StepLedger()
        self.documents: dict[str, dict[str, Any]] = {}  # each client's last report
        self.doc_ledgers: dict[str, StepLedger] = {}

    def round_start(self, round: int) -> None:
        pass

    def _release(self, arrived: int) -> None:
        sigma = self.dp.noise_multiplier
        if self.dp.noise == "distributed":
            sigma *= (arrived / self.cohort) ** 0.5
        self.ledger.add(self.cohort / self.num_clients, sigma)

    def client_epsilon(self) -> float:
        return epsilon(self.ledger.runs(), self.dp.delta, self.dp.accountant)

    def round_end(self, round: int, record: dict[str, Any], outcome: Any) -> dict[str, Any]:
        out: dict[str, Any] = {"dp_delta": self.dp.delta}
        if self.dp.client_level:
            if record.get("aggregated"):
                self._release(len(outcome.accepted))
            out["epsilon_client"] = self.client_epsilon()
            out["dp_rounds"] = self.ledger.runs()
        for client, meta in outcome.meta.items():
            report = meta.get("dp_document")
            if report:
                ledger = self.doc_ledgers.setdefault(client, StepLedger())
                ledger.add(report["sample_rate"], report["noise_multiplier"], int(report["steps"]))
                self.documents[client] = {**report, "steps": ledger.steps}
        if self.doc_ledgers:
            out["epsilon_document"] = self.document_epsilons()
            out["dp_document_runs"] = {c: l.runs() for c, l in sorted(self.doc_ledgers.items())}
        out["epsilon"] = self.epsilon()
        return out

    def document_epsilons(self) -> dict[str, float]:
        return {
            c: epsilon(l.runs(), self.documents.get(c, {}).get("delta", self.dp.delta), self.dp.accountant)
            for c, l in sorted(self.doc_ledgers.items())
        }

    def epsilon(self) -> float:
        """The client-level epsilon when client-level DP is on, else the largest document-level one."""
        if self.dp.client_level:
            return self.client_epsilon()
        return max(self.document_epsilons().values(), default=0.0)

    def resume_from(self, record: dict[str, Any]) -> None:
        """Continue the ledgers from the last metrics line of a resumed run."""
        self.ledger = StepLedger(tuple(r) for r in record.get("dp_rounds", []))
        self.doc_ledgers = {c: StepLedger(tuple(r) for r in runs) for c, runs in record.get("dp_document_runs", {}).items()}

    def summary(self) -> dict[str, Any]:
        """Fields for summary.json."""
        out: dict[str, Any] = {"epsilon": self.epsilon(), "privacy": {"delta": self.dp.delta, "accountant": self.dp.accountant}}
        if self.dp.client_level:
            out["privacy"]["client"] = {
                "epsilon": self.client_epsilon(), "clip": self.dp.clip, "noise_multiplier": self.dp.noise_multiplier,
                "noise": self.dp.noise, "sample_rate": self.cohort / self.num_clients, "rounds": self.ledger.steps,
            }
        if self.doc_ledgers:
            eps = self.document_epsilons()
            out["privacy"]["document"] = {c: {**self.documents.get(c, {}), "epsilon": eps[c]} for c in eps}
        return out


def privacy_summary(observers: list[Any]) -> dict[str, Any]:
    """summary.json fields of the privacy accountant among `observers` (empty when DP is off)."""
    for obs in observers:
        if isinstance(obs, PrivacyAccountant):
            return obs.summary()
    return {}
