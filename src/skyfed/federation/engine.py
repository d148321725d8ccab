"""The federation engine: the round loop, written once for every transport.

Each synchronous round: select clients, send each the global model, collect their
updates (until all are in or the round deadline passes), validate and decode them,
let the strategy aggregate, evaluate, log a line to metrics.jsonl and checkpoint.
A bad update is rejected and logged; it never touches the global model.

Streaming aggregation: when the strategy is a weighted mean of deltas (`MeanStrategy`:
FedAvg, FedProx and the FedOpt family), each update is folded into a running sum as
soon as it is received and validated, then dropped, so the server holds one update at
a time (plain fp32 updates are read as views into the received bytes, not copied).
Other strategies get the round's updates as a list.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch

from skyfed.checkpoint import load_checkpoint, save_checkpoint
from skyfed.compression.channel import Downlink, fp32_bytes
from skyfed.compression.payload import decode_payload
from skyfed.compression.wire import TensorSpec
from skyfed.config import ExperimentConfig
from skyfed.errors import SkyfedError
from skyfed.federation.messages import ClientResult, TrainTask, Update
from skyfed.federation.strategies import Strategy
from skyfed.federation.strategies.mean import MeanStrategy, RunningMean
from skyfed.federation.transport import Transport
from skyfed.metrics import RunDir
from skyfed.model import get_params, set_params
from skyfed.train import EvalResult

log = logging.getLogger(__name__)

Evaluator = Callable[[torch.nn.Module, "int | None"], EvalResult]
EventSink = Callable[[str, dict[str, Any]], None]


def select_clients(names: list[str], fraction: float, min_clients: int, rng: np.random.Generator) -> list[str]:
    """A seeded random subset of max(min_clients, ceil(fraction * n)) clients, in config order."""
    k = min(len(names), max(min_clients, math.ceil(fraction * len(names))))
    if k == len(names):
        return list(names)
    chosen = set(rng.choice(len(names), size=k, replace=False).tolist())
    return [n for i, n in enumerate(names) if i in chosen]


@dataclass
class RoundOutcome:
    updates: list[Update] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    rejected: dict[str, str] = field(default_factory=dict)
    compute_s: dict[str, float] = field(default_factory=dict)
    meta: dict[str, dict[str, Any]] = field(default_factory=dict)  # ClientResult.meta of each arrival
    aggregate_s: float = 0.0  # folding updates into the running mean, then the strategy's step


class Engine:
    def __init__(
        self,
        cfg: ExperimentConfig,
        transport: Transport,
        model: torch.nn.Module,
        param_names: list[str],
        strategy: Strategy,
        evaluator: Evaluator,
        run: RunDir,
        on_event: EventSink | None = None,
    ):
        self.cfg = cfg
        self.transport = transport
        self.model = model
        self.param_names = param_names
        self.strategy = strategy
        self.evaluator = evaluator
        self.run_dir = run
        self.on_event = on_event or (lambda kind, data: None)
        self.params = get_params(model, param_names)
        self.spec = {n: TensorSpec(tuple(t.shape), torch.float32) for n, t in self.params.items()}
        self.downlink = Downlink.from_config(cfg.compression, self.spec)
        self.version = 0
        self.next_round = 0
        self.totals = {"bytes_up": 0, "bytes_down": 0}
        self.started = time.perf_counter()
        self.elapsed_before = 0.0  # wall time of earlier sessions (resume)
        # Objects with round_start(round) and round_end(round, record, outcome) -> dict of
        # extra metrics (e.g. the simulated clock and egress bill, skyfed.runtime.cloud_metrics).
        self.observers: list[Any] = []
        # Fold each update into the aggregate as it arrives (see the module docstring);
        # False gives the strategy the round's updates as a list (same result).
        self.stream_aggregate = isinstance(strategy, MeanStrategy)

    # ------------------------------------------------------------ state

    @property
    def checkpoint_dir(self):
        return self.run_dir.path / "checkpoint"

    def state(self) -> dict[str, Any]:
        return {
            "round": self.next_round - 1,
            "next_round": self.next_round,
            "version": self.version,
            "strategy": self.strategy.state_dict(),
            "totals": dict(self.totals),
            "elapsed_s": self.elapsed_s(),
            "torch_rng": torch.get_rng_state(),
        }

    def elapsed_s(self) -> float:
        return self.elapsed_before + time.perf_counter() - self.started

    def save(self) -> None:
        save_checkpoint(self.checkpoint_dir, self.params, self.state())

    def resume(self) -> None:
        """Continue from the last complete round of the checkpoint in the run directory."""
        params, state = load_checkpoint(self.checkpoint_dir)
        if set(params) != set(self.param_names):
            raise SkyfedError(f"checkpoint in {self.checkpoint_dir} does not match this experiment's model")
        self.params = params
        set_params(self.model, params)
        self.version = state["version"]
        self.next_round = state["next_round"]
        self.strategy.load_state_dict(state["strategy"])
        self.totals = state["totals"]
        self.elapsed_before = state["elapsed_s"]
        self.started = time.perf_counter()
        torch.set_rng_state(state["torch_rng"])
        self.run_dir.truncate_metrics(self.next_round - 1)
        log.info("resumed after round %d (model version %d)", self.next_round - 1, self.version)

    # ------------------------------------------------------------ rounds

    def run(self) -> None:
        fed = self.cfg.federation
        if self.strategy.asynchronous:
            from skyfed.federation.async_loop import run_async

            return run_async(self)
        for r in range(self.next_round, fed.rounds):
            self.run_round(r)

    def _decode(self, result: ClientResult, round: int) -> Update:
        if result.error is not None or result.payload is None:
            raise SkyfedError(result.error or "no payload")
        delta, _ = decode_payload(
            result.payload, self.spec, self.cfg.federation.max_update_bytes, what=f"update from {result.client}", views=True
        )
        return Update(
            client=result.client,
            round=result.round,
            base_version=result.base_version,
            delta=delta,
            num_tokens=result.num_tokens,
            train_loss=result.train_loss,
            holdout_loss=result.holdout_loss,
            bytes_up=len(result.payload),
        )

    def collect(
        self, round: int, selected: list[str], deadline_s: float | None, running: RunningMean | None = None
    ) -> RoundOutcome:
        """Receive one result per selected client; reject bad, late, foreign or duplicate ones.

        With `running`, each validated update is folded into it and its tensors dropped
        (`outcome.updates` then keep everything but the delta)."""
        out = RoundOutcome()
        waiting = set(selected)
        end = None if deadline_s is None else self.transport.now() + deadline_s
        while waiting:
            timeout = None if end is None else max(0.0, end - self.transport.now())
            result = self.transport.receive(timeout)
            if result is None:
                break
            self._take(result, round, waiting, out, running)
            result.payload = None  # decoded, folded or ignored: the received bytes can go
            self.transport.release(result)
        out.missing = [c for c in selected if c in waiting]
        if out.missing:
            log.warning("round %d: no update from %s", round, ", ".join(out.missing))
        return out

    def _take(self, result: ClientResult, round: int, waiting: set[str], out: RoundOutcome, running: RunningMean | None) -> None:
        """Validate one result into `out` (and fold it into `running`), or ignore/reject it."""
        if result.client not in waiting or result.round != round:
            log.warning("ignored a result from %s for round %d during round %d", result.client, result.round, round)
            return
        waiting.discard(result.client)
        out.compute_s[result.client] = result.compute_s
        out.meta[result.client] = result.meta
        try:
            update = self._decode(result, round)
        except SkyfedError as exc:
            reason = str(exc)  # not the exception: its traceback would keep the payload alive
            out.rejected[result.client] = reason
            log.error("round %d: rejected the update from %s: %s", round, result.client, reason)
            return
        if running is not None:
            t0 = time.perf_counter()
            self.strategy.fold(running, update)  # type: ignore[attr-defined]
            update.delta = {}
            out.aggregate_s += time.perf_counter() - t0
        out.updates.append(update)

    def receive_round(self, r: int, reached: list[str]) -> tuple[RoundOutcome, bool, dict[str, Any]]:
        """Collect round r's updates from `reached` and, with a quorum, make the next global
        model: (outcome, aggregated, the strategy's metrics)."""
        fed = self.cfg.federation
        running = RunningMean(self.spec) if self.stream_aggregate else None
        outcome = self.collect(r, reached, fed.round_timeout_s, running)
        if len(outcome.updates) < fed.min_clients:
            log.error("round %d: %d updates < min_clients=%d; the global model is unchanged", r, len(outcome.updates), fed.min_clients)
            return outcome, False, {}
        t0 = time.perf_counter()
        if running is None:
            result = self.strategy.aggregate(self.params, outcome.updates, r)
        else:
            result = self.strategy.finish(self.params, running, r)  # type: ignore[attr-defined]
        del running
        self.params = {n: result.params[n].to(torch.float32).contiguous() for n in self.param_names}
        set_params(self.model, self.params)
        self.version += 1
        outcome.aggregate_s += time.perf_counter() - t0
        return outcome, True, result.metrics

    def run_round(self, r: int) -> dict[str, Any]:
        fed = self.cfg.federation
        t0 = time.perf_counter()
        rng = np.random.default_rng([self.cfg.seed, r, 7])
        selected = select_clients(self.transport.client_names(), fed.fraction, fed.min_clients, rng)
        self.on_event("round_start", {"round": r, "clients": selected})
        for obs in self.observers:
            obs.round_start(r)
        options = self.strategy.client_options(r)
        unreachable = [c for c in selected if not self.transport.reachable(c, r)]
        reached = [c for c in selected if c not in unreachable]
        payloads = {c: self.downlink.payload_for(c, self.params, r, self.version) for c in reached}
        for client in reached:
            self.transport.send(client, TrainTask(r, self.version, payloads[client], self.cfg.train.local_steps, options))
        outcome, aggregated, metrics = self.receive_round(r, reached)
        self.downlink.settle(reached, [u.client for u in outcome.updates])
        outcome.missing = [c for c in selected if c in unreachable or c in outcome.missing]
        aggregate_s = outcome.aggregate_s
        t_eval = time.perf_counter()
        ev = self.evaluator(self.model, self.cfg.eval.max_batches)
        eval_s = time.perf_counter() - t_eval
        bytes_up = {u.client: u.bytes_up for u in outcome.updates}
        bytes_down = {c: len(payloads[c]) for c in reached}
        self.totals["bytes_up"] += sum(bytes_up.values())
        self.totals["bytes_down"] += sum(bytes_down.values())
        self.next_round = r + 1
        record = {
            "round": r,
            "version": self.version,
            "clients": selected,
            "aggregated": aggregated,
            "missing": outcome.missing,
            "unreachable": unreachable,
            "rejected": outcome.rejected,
            "train_loss": {u.client: u.train_loss for u in outcome.updates},
            "val_loss": ev.loss,
            "val_ppl": ev.ppl,
            "val_token_acc": ev.token_acc,
            "bytes_up": sum(bytes_up.values()),
            "bytes_down": sum(bytes_down.values()),
            "bytes_up_by_client": bytes_up,
            "bytes_down_by_client": bytes_down,
            "fp32_bytes_up": len(bytes_up) * fp32_bytes(self.spec),  # the same tensors as plain fp32
            "fp32_bytes_down": len(bytes_down) * fp32_bytes(self.spec),
            "cum_bytes_up": self.totals["bytes_up"],
            "cum_bytes_down": self.totals["bytes_down"],
            "compute_s": outcome.compute_s,
            "aggregate_s": aggregate_s,
            "eval_s": eval_s,
            "wall_time_s": time.perf_counter() - t0,
            "elapsed_s": self.elapsed_s(),
            **metrics,
        }
        for obs in self.observers:
            record.update(obs.round_end(r, record, outcome))
        self.run_dir.append_metrics(record)
        self.save()
        self.on_event("round_end", record)
        return record
