"""The Ray runtime (`runtime: ray`): the simulated clients train in a pool of Ray actors.

    runtime: ray
    ray: {actors: 4, address: null}       # null: a local Ray; "auto": join `ray start`'s cluster

Each actor (`skyfed.runtime.replica.ClientReplica`) holds one model replica and trains
the logical clients it is sent, one at a time, so memory follows `ray.actors`, not the
number of clients. Between its rounds a client's state (optimizer moments, residual, the
model it holds) waits in Ray's object store (an `ObjectRef` held here) or in a file under
RUN_DIR/clients/NAME.G.safetensors (`ray.client_state: disk`; G counts the client's
tasks, so a checkpoint can name a file that later rounds do not overwrite; the files
and their bookkeeping are the in-process simulation's, skyfed.runtime.client_state).
Each distinct model payload of a round
is put in the object store once and every task refers to it; each client's token shard is
put once, at start.

`RayTransport` is the simulated transport (`skyfed.runtime.inprocess`) with the training
moved to the actors: `send` submits without waiting; before a `receive` the results are
collected and scheduled in send order, each from the simulated clock at its send, by the
same `_schedule`. A client's computation depends only on its state, its shard, its seed
and its task, never on which actor runs it, so with one torch thread per actor a run is
bit-identical to the in-process simulation (tests/test_ray_equals_inprocess_*.py).
With `ray.keep_actors` the actors outlive the run (where Ray does) and the next run of
this process rebuilds its replicas in them (docs/scale.md, "Kept actors").
"""

from __future__ import annotations

import logging
import os
from collections import deque
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from skyfed.clouds import CloudNetwork, network_from_config
from skyfed.config import ExperimentConfig
from skyfed.errors import ConfigError, SkyfedError
from skyfed.federation.engine import EventSink
from skyfed.federation.messages import ClientResult, TrainTask
from skyfed.runtime.client_state import ClientStateFiles
from skyfed.runtime.inprocess import SimulatedTransport
from skyfed.runtime.replica import ClientReplica
from skyfed.runtime.setup import PreparedData

log = logging.getLogger(__name__)

# Actors kept between the runs of this process (`ray.keep_actors`): (Ray session, CPUs per actor, actor).
_KEPT: list[tuple[tuple[str, str], float, Any]] = []


def _ray():
    try:
        import ray
    except ImportError:
        raise ConfigError("runtime: ray needs Ray: pip install 'skyfed[ray]'") from None
    return ray


def start_ray(cfg: ExperimentConfig) -> bool:
    """Connect to Ray as `ray.address` says; returns whether this call started it (then
    `ray.shutdown()` is ours to call)."""
    ray = _ray()
    if ray.is_initialized():
        return False
    opts = cfg.ray
    env = {"env_vars": {"PYTHONPATH": os.environ.get("PYTHONPATH", "")}} if os.environ.get("PYTHONPATH") else None
    kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": True, "runtime_env": env}
    if opts.address is None:
        # Ray starts its worker processes at niceness 15 (RayConfig worker_niceness): on a
        # machine shared with other work the actors, which do all the training here, then
        # get a few percent of a core. The workers inherit this from the raylet we start.
        os.environ.setdefault("RAY_worker_niceness", "0")
        kwargs["num_cpus"] = opts.num_cpus
        if opts.object_store_mb is not None:
            kwargs["object_store_memory"] = opts.object_store_mb * 2**20
    # Ray waits a fixed 30 s for a local raylet to register; on an overloaded machine that
    # can pass: a local Ray is started once more before giving up.
    retry = opts.address is None
    while True:
        try:
            ray.init(address=opts.address, **kwargs)
            return True
        except Exception as exc:  # noqa: BLE001 - a cluster that cannot be reached is a config problem
            if not (retry and "timed out during startup" in str(exc)):
                raise SkyfedError(f"ray.init(address={opts.address!r}) failed: {type(exc).__name__}: {exc}") from None
            retry = False
            log.warning("the local Ray did not start within Ray's 30 s; starting it once more")
            ray.shutdown()


class RayTransport(SimulatedTransport):
    """See the module docstring."""

    def __init__(
        self,
        cfg: ExperimentConfig,
        tokenizer,
        client_tokens: dict[str, np.ndarray],
        network: CloudNetwork | None = None,
        on_step: Callable[[str, int, int, float], None] | None = None,
        start_s: float = 0.0,
    ):
        super().__init__([], network, start_s)
        self.names = list(client_tokens)
        self.index = {n: i for i, n in enumerate(self.names)}
        self.on_step = on_step
        self.on_disk = cfg.ray.client_state == "disk"  # self.files: set by `use_run_dir`
        self._owns_ray = False
        self._actors: list[Any] = []
        self._states: dict[str, Any] = {}  # client -> ObjectRef of its state (object store) or None
        self._last: dict[str, Any] = {}  # client -> ObjectRef of its latest result (disk: orders its tasks)
        self._pending: deque[tuple[str, TrainTask, float, Any]] = deque()
        self._payloads: dict[int, tuple[bytes, Any]] = {}  # id(payload) -> (payload, ObjectRef)
        self._payload_version: int | None = None
        self.payload_puts = 0  # object-store copies of model payloads so far
        self._next_actor = 0
        self._keep = (cfg.ray.keep_actors, cfg.ray.num_cpus_per_actor)
        self._owns_ray = start_ray(cfg)
        try:
            ray = _ray()
            self._tokens = {n: ray.put(np.asarray(t)) for n, t in client_tokens.items()}
            n = max(1, min(cfg.ray.actors, len(self.names)))
            actor = ray.remote(ClientReplica).options(num_cpus=cfg.ray.num_cpus_per_actor, max_restarts=0)
            threads = max(1, int(cfg.ray.num_cpus_per_actor))
            self._actors = _reconfigured(_take_kept(cfg.ray.num_cpus_per_actor, n), cfg, tokenizer, threads)
            reused = len(self._actors)
            self._actors += [actor.remote(cfg, tokenizer, threads) for _ in range(n - reused)]
            self._get([a.pid.remote() for a in self._actors], "starting the actors")
            log.info("%d Ray actors (%d kept from an earlier run), %d torch thread(s) each", n, reused, threads)
        except BaseException:
            self.close()
            raise

    def client_names(self) -> list[str]:
        return list(self.names)

    def use_run_dir(self, path: Path) -> None:
        """Client state files go under `path`/clients (`ray.client_state: disk`)."""
        if self.on_disk:
            self.files = ClientStateFiles(Path(path) / "clients")

    # ------------------------------------------------------------ sending and collecting

    def _payload_ref(self, task: TrainTask) -> Any:
        """One object-store copy per distinct payload of a model version (the server core
        hands every client with the same base the same bytes object); a new version
        drops the previous version's copies."""
        if task.version != self._payload_version:
            self._payloads, self._payload_version = {}, task.version
        known = self._payloads.get(id(task.payload))
        if known is not None and known[0] is task.payload:
            return known[1]
        ref = _ray().put(task.payload)
        self._payloads[id(task.payload)] = (task.payload, ref)
        self.payload_puts += 1
        return ref

    def send(self, client: str, task: TrainTask) -> None:
        actor = self._actors[self._next_actor % len(self._actors)]
        self._next_actor += 1
        light = TrainTask(task.round, task.version, b"", task.steps, task.options)
        if self.on_disk:
            if self.files is None:
                raise SkyfedError("ray.client_state: disk needs the run directory (RayTransport.use_run_dir)")
            old = self.files.current(client)
            new = self.files.next(client)  # a new file: the checkpoint may name the old one
            done, _ = actor.handle.options(num_returns=2).remote(
                client, self.index[client], self._tokens[client], None if old is None else str(old),
                light, self._payload_ref(task), str(new), self._last.get(client),
            )
            self._last[client] = done
        else:
            done, state_ref = actor.handle.options(num_returns=2).remote(
                client, self.index[client], self._tokens[client], self._states.get(client), light,
                self._payload_ref(task),
            )
            self._states[client] = state_ref  # the next task of this client waits for it
        self._pending.append((client, task, self._now, done))

    def settle(self) -> None:
        while self._pending:
            client, task, sent_s, done = self._pending.popleft()
            result, steps = self._get(done, f"client {client}")
            if self._last.get(client) is done:
                del self._last[client]  # done: nothing to wait for, nothing to keep in the store
            if self.on_step is not None:
                for step in steps:
                    self.on_step(*step)
            self._schedule(client, task, result, sent_s)

    def _get(self, ref: Any, what: str) -> Any:
        ray = _ray()
        try:
            return ray.get(ref)
        except ray.exceptions.RayTaskError as exc:
            cause = exc.cause if getattr(exc, "cause", None) is not None else exc
            raise SkyfedError(f"{what} failed in a Ray actor: {type(cause).__name__}: {_first_line(cause)}") from None
        except ray.exceptions.RayError as exc:
            raise SkyfedError(f"{what}: a Ray actor died: {type(exc).__name__}: {_first_line(exc)}") from None

    def receive(self, timeout: float | None = None) -> ClientResult | None:
        self.settle()
        return super().receive(timeout)

    def in_flight(self) -> int:
        return len(self._pending) + super().in_flight()

    # ------------------------------------------------------------ checkpoint

    def state_dict(self) -> dict:
        """The clock, the results travelling, the bill, and every client's state: fetched
        from the object store, or (disk) the names of the state files, which are kept
        until neither this checkpoint nor the one before names them. A resumed run
        continues exactly."""
        state = super().state_dict()
        if not self.on_disk:
            refs = {n: r for n, r in self._states.items() if r is not None}
            values = self._get(list(refs.values()), "fetching client state") if refs else []
            state["clients"] = dict(zip(refs, values))
        return state

    def load_state_dict(self, state: dict) -> None:
        clients = state["clients"]
        if self.on_disk and self.files is None:
            raise SkyfedError("ray.client_state: disk needs the run directory before resuming")
        super().load_state_dict({**state, "clients": {}})
        if not self.on_disk:
            ray = _ray()
            self._states = {name: ray.put(client_state) for name, client_state in clients.items()}

    def close(self) -> None:
        """Stop the actors (or keep them for the next run, `ray.keep_actors`), and Ray
        itself when this transport started it."""
        try:
            if self._actors:
                ray = _ray()
                keep, cpus = self._keep
                if keep and not self._owns_ray:
                    _KEPT.extend((_session(), cpus, a) for a in self._actors)
                else:
                    for a in self._actors:
                        ray.kill(a)
        finally:
            self._actors, self._states, self._last, self._payloads, self._pending = [], {}, {}, {}, deque()
            if self._owns_ray:
                _ray().shutdown()
                self._owns_ray = False


def _take_kept(cpus: float, n: int) -> list[Any]:
    """Up to `n` kept actors of this Ray job with `cpus` CPUs each; the other kept actors
    are stopped, so that none holds CPUs the new ones need."""
    if not _KEPT:
        return []
    ray = _ray()
    session = _session()
    kept = [(s, c, a) for s, c, a in _KEPT if s == session]  # the others died with their Ray
    _KEPT.clear()
    take = [a for _, c, a in kept if c == cpus][:n]
    for _, _, a in kept:
        if not any(a is t for t in take):
            ray.kill(a)
    return take


def _session() -> tuple[str, str]:
    """This driver's Ray job and node: a Ray started again numbers its jobs from 1 again."""
    context = _ray().get_runtime_context()
    return context.get_job_id(), context.get_node_id()


def _reconfigured(actors: list[Any], cfg: ExperimentConfig, tokenizer, threads: int) -> list[Any]:
    """The kept `actors` that rebuilt their replica for this run; one that died is left out."""
    ray = _ray()
    ready = [(a, a.configure.remote(cfg, tokenizer, threads)) for a in actors]
    alive = []
    for a, ref in ready:
        try:
            ray.get(ref)
            alive.append(a)
        except ray.exceptions.RayActorError:
            log.warning("a kept Ray actor has died; starting a new one")
    return alive


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[-1] if text else type(exc).__name__


def ray_transport(run_dir: Path | None = None) -> Callable[[ExperimentConfig, PreparedData, torch.device, EventSink], RayTransport]:
    """The transport factory `assemble` calls for `runtime: ray`; `run_dir` is where
    `ray.client_state: disk` keeps the states (RUN_DIR/clients)."""

    def factory(cfg: ExperimentConfig, data: PreparedData, device: torch.device, emit: EventSink) -> RayTransport:
        if cfg.security.secure_aggregation:
            raise ConfigError("runtime: ray does not run secure aggregation yet; use runtime: inprocess")
        network = network_from_config(cfg, 0) if cfg.clouds.simulate else None

        def on_step(name: str, step: int, steps: int, loss: float) -> None:
            emit("local_step", {"client": name, "step": step, "steps": steps, "loss": loss})

        emit("status", {"message": f"starting {cfg.ray.actors} Ray actors"})
        tokens = {s.name: data.client_tokens[s.name] for s in cfg.federation.clients}
        link = RayTransport(cfg, data.tokenizer, tokens, network, on_step)
        if run_dir is not None:
            link.use_run_dir(run_dir)
        return link

    return factory
