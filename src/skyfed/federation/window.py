"""Closing a window: the one place a round (or an asynchronous window) becomes a record.

Both loop policies collect what happened into a `Window` and hand it to
`WindowCloser.close`, which evaluates the global model, adds the window's bytes to the
totals, builds the metrics.jsonl line (the same keys for both loops; the asynchronous
loop adds its own fields through `Window.extra`), lets every observer add its fields
(the simulated clock and egress bill, the privacy accountant, trackers), appends the
line, checkpoints, and emits `round_end`.
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch

from skyfed.federation.server import ServerCore
from skyfed.metrics import RunDir
from skyfed.train import EvalResult

Evaluator = Callable[[torch.nn.Module, "int | None"], EvalResult]
EventSink = Callable[[str, dict[str, Any]], None]


@dataclass
class Window:
    """What happened between two metrics lines."""

    round: int
    clients: list[str]  # selected (sync) or that arrived (async)
    started: float = field(default_factory=time.perf_counter)
    accepted: list[str] = field(default_factory=list)  # clients whose update was accepted, in arrival order
    rejected: dict[str, str] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)
    unreachable: list[str] = field(default_factory=list)
    train_loss: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    bytes_up: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    bytes_down: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    compute_s: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    meta: dict[str, dict[str, Any]] = field(default_factory=dict)  # ClientResult.meta of each arrival
    decoded: int = 0  # updates decoded (their fp32 size is the compression ratio's numerator)
    dispatched: int = 0  # tasks sent
    fp32_up: int = 0  # the decoded updates' and the tasks' tensors as plain fp32 (the compression ratios)
    fp32_down: int = 0
    aggregated: bool = False
    aggregate_s: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)  # strategy metrics, loop-specific fields


class Stopwatch:
    """Wall time of the whole run, across resumed sessions."""

    def __init__(self) -> None:
        self.before = 0.0
        self.started = time.perf_counter()

    def elapsed_s(self) -> float:
        return self.before + time.perf_counter() - self.started

    def state_dict(self) -> dict[str, Any]:
        return {"elapsed_s": self.elapsed_s()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.before, self.started = float(state["elapsed_s"]), time.perf_counter()


class WindowCloser:
    def __init__(
        self,
        core: ServerCore,
        evaluator: Evaluator,
        eval_batches: int | None,
        run_dir: RunDir,
        on_event: EventSink | None = None,
    ):
        self.core = core
        self.evaluator = evaluator
        self.eval_batches = eval_batches
        self.run_dir = run_dir
        self.on_event = on_event or (lambda kind, data: None)
        self.stopwatch = Stopwatch()
        # Objects with round_start(round) and round_end(round, record, window) -> dict of
        # extra fields for the line (e.g. skyfed.runtime.cloud_metrics.CloudAccounting).
        self.observers: list[Any] = []
        self.checkpoint: Callable[[int], None] | None = None  # save(round), set by the engine

    def open(self, round: int, clients: list[str]) -> Window:
        self.on_event("round_start", {"round": round, "clients": clients})
        for obs in self.observers:
            obs.round_start(round)
        return Window(round, list(clients))

    def close(self, w: Window) -> dict[str, Any]:
        core = self.core
        t_eval = time.perf_counter()
        ev = self.evaluator(core.model, self.eval_batches)
        eval_s = time.perf_counter() - t_eval
        up, down = dict(w.bytes_up), dict(w.bytes_down)
        core.totals["bytes_up"] += sum(up.values())
        core.totals["bytes_down"] += sum(down.values())
        record = {
            "round": w.round,
            "version": core.version,
            "clients": w.clients,
            "aggregated": w.aggregated,
            "missing": w.missing,
            "unreachable": w.unreachable,
            "rejected": w.rejected,
            "train_loss": {c: float(np.mean(v)) for c, v in w.train_loss.items()},
            "val_loss": ev.loss,
            "val_ppl": ev.ppl,
            "val_token_acc": ev.token_acc,
            "bytes_up": sum(up.values()),
            "bytes_down": sum(down.values()),
            "bytes_up_by_client": up,
            "bytes_down_by_client": down,
            "fp32_bytes_up": w.fp32_up,  # the same tensors as plain fp32
            "fp32_bytes_down": w.fp32_down,
            "cum_bytes_up": core.totals["bytes_up"],
            "cum_bytes_down": core.totals["bytes_down"],
            "compute_s": dict(w.compute_s),
            "aggregate_s": w.aggregate_s,
            "eval_s": eval_s,
            "wall_time_s": time.perf_counter() - w.started,
            "elapsed_s": self.stopwatch.elapsed_s(),
            **w.extra,
        }
        if core.lora is not None:  # per-client LoRA ranks, exact aggregation (skyfed.lora_server)
            record["lora"] = core.lora.window_metrics()
        for obs in self.observers:
            record.update(obs.round_end(w.round, record, w))
        self.run_dir.append_metrics(record)
        if self.checkpoint is not None:
            self.checkpoint(w.round)
        self.on_event("round_end", record)
        return record
