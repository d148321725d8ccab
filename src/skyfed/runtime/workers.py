"""Client worker processes for the simulation (`workers` > 1).

Each worker is a spawned process (never forked: torch and OpenMP are not fork-safe) that
builds its clients once with the project's `make_client` and keeps them for the whole
run, so a client's model, optimizer state, error-feedback residual and downlink receiver
live in exactly one process. Client i belongs to worker i % workers. The parent submits
(client, task) to the owner's queue without waiting and reads that worker's results in
the order submitted; a worker handles its tasks one at a time.

A client that raises, or a worker that dies, becomes a `SkyfedError` in the parent
(never a hang); `close` stops every worker.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import pickle
import queue
import signal
import traceback
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from skyfed.config import ExperimentConfig
from skyfed.errors import SkyfedError
from skyfed.federation.messages import ClientResult, TrainTask

log = logging.getLogger(__name__)

POLL_S = 0.2  # how often a waiting parent checks that the worker is alive
Step = tuple[str, int, int, float]  # client, step, steps, loss (FederatedClient.on_step)


@dataclass
class ClientInit:
    """What a worker needs to build one client (all picklable)."""

    name: str
    index: int
    tokens: np.ndarray


def worker_threads(cfg: ExperimentConfig, workers: int) -> int:
    """Torch threads per worker: the configured (or default) threads shared out, at least 1."""
    return max(1, (cfg.threads or torch.get_num_threads()) // workers)


def _serve(tasks, results, cfg: ExperimentConfig, inits: list[ClientInit], tokenizer, threads: int, build: Callable):
    """A worker's main loop: build the clients, then handle tasks until a None arrives."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle; it stops us
    try:
        from skyfed.runtime.setup import device_for

        torch.set_num_threads(threads)
        device = device_for(cfg)
        steps: list[Step] = []
        clients = {}
        for init in inits:
            client = build(cfg, init.name, init.index, init.tokens, tokenizer, device)
            client.on_step = lambda *step: steps.append(step)
            clients[init.name] = client
    except BaseException as exc:  # noqa: BLE001 - reported to the parent, which raises
        _report(results, f"building clients failed: {type(exc).__name__}: {exc}")
        return
    results.put(("ready", None))
    while (msg := _next(tasks)) is not None:
        name, task = pickle.loads(msg)
        steps.clear()
        try:
            result = clients[name].handle(task)
        except BaseException as exc:  # noqa: BLE001
            _report(results, f"client {name} failed: {type(exc).__name__}: {exc}")
            return
        results.put(("ok", (result, list(steps))))
    results.cancel_join_thread()  # stopping: results the parent no longer reads must not keep us alive


def _report(results, message: str) -> None:
    """The traceback to this worker's stderr, one line to the parent (a SkyfedError there)."""
    traceback.print_exc()
    results.put(("error", message))


def _next(tasks) -> Any:
    """The next task, or None once the parent asks us to stop or is gone (killed)."""
    parent = mp.parent_process()
    while True:
        try:
            return tasks.get(timeout=1.0)
        except queue.Empty:
            if parent is not None and not parent.is_alive():
                return None


class WorkerPool:
    """Spawned worker processes that own the clients; see the module docstring."""

    def __init__(
        self, cfg: ExperimentConfig, inits: list[ClientInit], tokenizer, workers: int, build: Callable | None = None
    ):
        if build is None:
            from skyfed.runtime.setup import make_client as build
        ctx = mp.get_context("spawn")
        n = max(1, min(workers, len(inits)))
        threads = worker_threads(cfg, n)
        self.owner = {init.name: i % n for i, init in enumerate(inits)}
        self._procs: list[Any] = []
        self._tasks: list[Any] = []
        self._results: list[Any] = []
        try:
            for w in range(n):
                group = inits[w::n]
                tasks, results = ctx.Queue(), ctx.Queue()
                proc = ctx.Process(
                    target=_serve, args=(tasks, results, cfg, group, tokenizer, threads, build),
                    name=f"skyfed-worker-{w}", daemon=True,
                )
                proc.start()
                self._procs.append(proc)
                self._tasks.append(tasks)
                self._results.append(results)
            for w in range(n):
                self._get(w)  # "ready", or the worker's error
        except BaseException:
            self.close()
            raise
        log.info("%d client workers started, %d torch thread(s) each", n, threads)

    def submit(self, client: str, task: TrainTask) -> None:
        """Queue a task for the worker that owns `client`; does not wait."""
        # Pickled now: a Queue pickles in a background thread, after the caller moved on.
        self._tasks[self.owner[client]].put(pickle.dumps((client, task), pickle.HIGHEST_PROTOCOL))

    def result(self, client: str) -> tuple[ClientResult, list[Step]]:
        """The next result of `client`'s worker (results come in submission order) and
        the local steps it reported."""
        return self._get(self.owner[client])

    def _get(self, w: int) -> Any:
        proc = self._procs[w]
        while True:
            try:
                kind, value = self._results[w].get(timeout=POLL_S)
                break
            except queue.Empty:
                if not proc.is_alive() and self._results[w].empty():
                    clients = ", ".join(c for c, o in self.owner.items() if o == w)
                    raise SkyfedError(f"client worker {w} ({clients}) died with exit code {proc.exitcode}") from None
        if kind == "error":
            raise SkyfedError(f"client worker {w}: {value}")
        return value

    def close(self) -> None:
        """Stop every worker: ask politely, then terminate; no process is left behind."""
        for tasks, proc in zip(self._tasks, self._procs):
            if proc.is_alive():
                try:
                    tasks.put(None)
                except (OSError, ValueError):
                    pass
        for proc in self._procs:
            proc.join(timeout=5)
            if proc.is_alive():
                proc.terminate()
                proc.join(timeout=5)
            if proc.is_alive():
                proc.kill()
                proc.join()
        for q in self._tasks + self._results:
            q.cancel_join_thread()  # a dead worker never read its queue: do not wait on it
            q.close()
        self._procs, self._tasks, self._results = [], [], []
