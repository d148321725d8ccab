"""The federation engine: the server core, the window closer and a loop policy, put
together once for every transport.

    core    = ServerCore(...)        the global model, its version, downlink, totals, strategy
    closer  = WindowCloser(...)      evaluation, the metrics line, observers, checkpoint
    loop    = SyncLoop | AsyncLoop   synchronous rounds, or asynchronous events (FedAsync, FedBuff)

The engine chooses the loop from the strategy, registers the checkpoint's parts (the
core, the loop, the stopwatch; runtimes add theirs to `checkpointer.parts`) and resumes
from them. It never knows whether the clients are objects in this process
(simulation), processes on other clouds (gRPC) or Ray actors.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from skyfed.config import ExperimentConfig
from skyfed.federation.checkpoint import Checkpointer
from skyfed.federation.loops.async_ import AsyncLoop
from skyfed.federation.loops.sync import SyncLoop, select_clients
from skyfed.federation.server import ServerCore
from skyfed.federation.steps import client_steps
from skyfed.federation.strategies import Strategy
from skyfed.federation.transport import Transport
from skyfed.federation.window import EventSink, Evaluator, WindowCloser
from skyfed.metrics import RunDir

log = logging.getLogger(__name__)

__all__ = ["Engine", "EventSink", "Evaluator", "select_clients"]


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
        self.run_dir = run
        tc = cfg.train
        self.core = ServerCore(
            model, param_names, strategy, cfg.compression, cfg.federation.max_update_bytes, tc.batch_size * tc.seq_len
        )
        self.core.downlink.clients = {c.name for c in cfg.federation.clients}  # to know when none needs the initial model
        self.core.local_steps = client_steps(cfg, sum(p.numel() for p in model.parameters()))
        from skyfed.lora_server import lora_server

        self.core.lora = lora_server(cfg, model, self.core.spec, strategy)  # LoRA ranks per client, exact aggregation
        ev = cfg.eval
        self.closer = WindowCloser(self.core, evaluator, ev.max_batches, run, on_event, ev.max_tokens, ev.interval,
                                   cfg.federation.rounds)
        loop_cls = AsyncLoop if strategy.asynchronous else SyncLoop
        if strategy.asynchronous and cfg.security.secure_aggregation:  # FedBuff: one secure sum per buffer
            from skyfed.federation.loops.secure_buffer import SecureBufferLoop

            loop_cls = SecureBufferLoop
        self.loop: SyncLoop | AsyncLoop = loop_cls(self.core, transport, self.closer, cfg)
        self.checkpointer = Checkpointer(run.path / "checkpoint", self.core)
        self.checkpointer.parts.update(loop=self.loop, stopwatch=self.closer.stopwatch)
        self.closer.checkpoint = self.checkpointer.save

    # ------------------------------------------------------------ views

    @property
    def observers(self) -> list[Any]:
        return self.closer.observers

    @property
    def params(self):
        return self.core.params

    @property
    def version(self) -> int:
        return self.core.version

    @property
    def downlink(self):
        return self.core.downlink

    @property
    def next_round(self) -> int:
        return self.loop.next_round

    @property
    def stream_aggregate(self) -> bool:
        return self.core.streaming

    @stream_aggregate.setter
    def stream_aggregate(self, value: bool) -> None:
        self.core.streaming = value

    # ------------------------------------------------------------ running

    def run(self) -> None:
        self.loop.run()

    def run_round(self, r: int) -> dict[str, Any]:
        """One synchronous round (tests and benchmarks drive rounds one at a time)."""
        return self.loop.run_round(r)  # type: ignore[union-attr]

    def resume(self) -> int:
        """Restore every registered part from the run directory's checkpoint and drop the
        metrics lines after it; returns the last complete round."""
        last, restored = self.checkpointer.load()
        if isinstance(self.loop, AsyncLoop) and "transport" not in restored:
            self.loop.resend = True  # the transport lost the tasks in flight: send them again
        self.run_dir.truncate_metrics(last)
        log.info("resumed after round %d (model version %d)", last, self.core.version)
        return last
