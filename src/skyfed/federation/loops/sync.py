"""Synchronous rounds (FedAvg's loop, McMahan et al. 2017).

Each round: select clients (seeded), send each the current model, collect one result
per client until all are in or `federation.round_timeout_s` passes, let the server
core validate each one and fold it into the round's aggregate, and with at least
`federation.min_clients` updates publish the strategy's next model. The window closer
then evaluates, writes the metrics line and checkpoints.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

import numpy as np

from skyfed.config import ExperimentConfig
from skyfed.errors import SkyfedError
from skyfed.federation.messages import TrainTask
from skyfed.federation.server import Rejection, ServerCore
from skyfed.federation.transport import Transport
from skyfed.federation.window import Window, WindowCloser

log = logging.getLogger(__name__)


def select_clients(names: list[str], fraction: float, min_clients: int, rng: np.random.Generator) -> list[str]:
    """A seeded random subset of max(min_clients, ceil(fraction * n)) clients, in config order."""
    k = min(len(names), max(min_clients, math.ceil(fraction * len(names))))
    if k == len(names):
        return list(names)
    chosen = set(rng.choice(len(names), size=k, replace=False).tolist())
    return [n for i, n in enumerate(names) if i in chosen]


class SyncLoop:
    def __init__(self, core: ServerCore, transport: Transport, closer: WindowCloser, cfg: ExperimentConfig):
        self.core = core
        self.transport = transport
        self.closer = closer
        self.cfg = cfg
        self.next_round = 0
        self.secure = None  # a SecAggCoordinator when security.secure_aggregation is on
        if cfg.security.secure_aggregation:
            from skyfed.security.secagg.coordinator import SecAggCoordinator
            from skyfed.security.secagg.simulated import settings_from_config

            tc = cfg.train
            self.secure = SecAggCoordinator(
                core.spec, settings_from_config(cfg.security.secagg), tc.local_steps * tc.batch_size * tc.seq_len,
                cfg.federation.round_timeout_s, cfg.federation.max_update_bytes,
            )

    def run(self) -> None:
        for r in range(self.next_round, self.cfg.federation.rounds):
            self.run_round(r)

    def run_round(self, r: int) -> dict[str, Any]:
        fed, core = self.cfg.federation, self.core
        rng = np.random.default_rng([self.cfg.seed, r, 7])
        selected = select_clients(self.transport.client_names(), fed.fraction, fed.min_clients, rng)
        w = self.closer.open(r, selected)
        options = core.strategy.client_options(r)
        w.unreachable = [c for c in selected if not self.transport.reachable(c, r)]
        reached = [c for c in selected if c not in w.unreachable]
        extra: dict[str, dict[str, Any]] = {c: {} for c in reached}
        if self.secure is not None:  # keys and shares first; who completes set-up trains
            extra = self._setup_secure(w, reached)
        steps = {c: core.local_steps.get(c, self.cfg.train.local_steps) for c in reached}
        tasks = {c: core.task(c, r, steps[c], {**options, **extra[c]}) for c in reached if c in extra}
        for client, task in tasks.items():
            self.transport.send(client, task)
            w.bytes_down[client] = len(task.payload)
            w.fp32_down += core.fp32_bytes(client)
        w.dispatched = len(tasks)
        waiting = self.collect(w, tasks)
        if self.secure is not None:
            self._count_control(w)
        core.settle(reached, w.accepted)
        # unreachable, silent, or (secure aggregation) dropped out during the set-up
        w.missing = [c for c in selected if c in w.unreachable or c in waiting or (c in reached and c not in tasks)]
        if waiting:
            log.warning("round %d: no update from %s", r, ", ".join(sorted(waiting)))
        self.next_round = r + 1
        return self.closer.close(w)

    def collect(self, w: Window, tasks: dict[str, TrainTask]) -> set[str]:
        """Receive round `w.round`'s results, validate and fold them, and publish the next
        model with a quorum; returns the clients that never answered."""
        fed, core, r = self.cfg.federation, self.core, w.round
        aggregate = core.new_aggregate()
        waiting = set(tasks)
        end = None if fed.round_timeout_s is None else self.transport.now() + fed.round_timeout_s
        while waiting:
            timeout = None if end is None else max(0.0, end - self.transport.now())
            result = self.transport.receive(timeout)
            if result is None:
                break
            if result.client not in waiting or result.round != r:
                log.warning("ignored a result from %s for round %d during round %d", result.client, result.round, r)
                result.payload = None
                self.transport.release(result, f"round {result.round} is not open for {result.client}")
                continue
            waiting.discard(result.client)
            w.compute_s[result.client] = result.compute_s
            w.meta[result.client] = result.meta
            task = tasks[result.client]
            if self.secure is not None:
                self._accept_masked(w, result)
                continue
            got = core.accept(result, task.round, task.version, task.steps)
            result.payload = None  # decoded (or refused): the received bytes can go
            if isinstance(got, Rejection):
                w.rejected[got.client] = got.reason
                log.error("round %d: rejected the update from %s: %s", r, got.client, got.reason)
                self.transport.release(result, got.reason)
                continue
            w.decoded += 1
            w.fp32_up += core.fp32_bytes(got.client)
            w.bytes_up[got.client] = got.bytes_up
            w.train_loss[got.client].append(got.train_loss)
            self.transport.release(result)  # validated: the client may hear so while it is folded
            aggregate.add(got)
            w.accepted.append(got.client)
        if self.secure is not None:
            self._publish_secure(w)
        elif len(aggregate) < fed.min_clients:
            log.error("round %d: %d updates < min_clients=%d; the global model is unchanged", r, len(aggregate), fed.min_clients)
        else:
            out = aggregate.result(core.params, r)
            try:
                core.publish(out)
                w.aggregated = True
                w.extra.update(out.metrics)
            except SkyfedError as exc:
                log.error("round %d: %s", r, exc)
                w.extra["aggregate_error"] = str(exc)
        w.aggregate_s += aggregate.seconds
        return waiting

    def _setup_secure(self, w: Window, reached: list[str]) -> dict[str, dict[str, Any]]:
        """Secure aggregation's keys and shares stages; the training-task options of the
        clients that completed them (none when the set-up failed: the round is refused)."""
        from skyfed.errors import SecAggError

        try:
            return self.secure.setup(self.transport, reached, w.round, self.core.version)
        except SecAggError as exc:
            log.error("round %d: secure aggregation set-up refused: %s; the global model is unchanged", w.round, exc)
            w.extra["aggregate_error"] = str(exc)
            return {}

    def _count_control(self, w: Window) -> None:
        """Secure aggregation's control messages crossed the wire too: add them to the round's bytes."""
        for client, n in self.secure.bytes_up.items():
            w.bytes_up[client] += n
        for client, n in self.secure.bytes_down.items():
            w.bytes_down[client] += n
        w.extra["secagg_bytes_up"] = sum(self.secure.bytes_up.values())
        w.extra["secagg_bytes_down"] = sum(self.secure.bytes_down.values())

    def _accept_masked(self, w: Window, result) -> None:
        """Secure aggregation: fold a masked vector into the ring sum (never decoded alone)."""
        nbytes = len(result.payload) if result.payload is not None else 0
        if self.secure.accept(result):
            w.decoded += 1
            w.fp32_up += self.core.fp32_bytes(result.client)
            w.bytes_up[result.client] = nbytes
            w.train_loss[result.client].append(result.train_loss)
            w.accepted.append(result.client)
            self.transport.release(result)
        else:
            w.rejected[result.client] = result.error or "masked update refused"
            self.transport.release(result, w.rejected[result.client])
        result.payload = None

    def _publish_secure(self, w: Window) -> None:
        """Unmask the sum with the survivors' shares and step on it; too few survivors leave
        the model unchanged."""
        from skyfed.errors import SecAggError

        core, r = self.core, w.round
        if self.secure.server is None:  # the set-up was refused (logged)
            return
        if len(w.accepted) < self.cfg.federation.min_clients:
            log.error("round %d: %d masked updates < min_clients; the global model is unchanged", r, len(w.accepted))
            return
        t0 = time.perf_counter()
        try:
            outcome = self.secure.finish(self.transport, r, core.version)
            out = core.strategy.aggregate(core.params, [outcome.update], r)
            core.publish(out)
        except SkyfedError as exc:
            kind = "secure aggregation" if isinstance(exc, SecAggError) else "aggregate"
            log.error("round %d: %s refused: %s; the global model is unchanged", r, kind, exc)
            w.extra["aggregate_error"] = str(exc)
            return
        finally:
            w.aggregate_s += time.perf_counter() - t0
        w.aggregated = True
        w.extra.update({**out.metrics, "secure_aggregation": {"survivors": outcome.survivors, "dropped": outcome.dropped}})

    def state_dict(self) -> dict[str, Any]:
        return {"next_round": self.next_round}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.next_round = int(state["next_round"])
