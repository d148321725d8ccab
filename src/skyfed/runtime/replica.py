"""One model replica that trains many logical clients in turn: memory follows the replicas,
not the number of clients.

`ClientReplica` builds one `FederatedClient` with the project's `make_client` (one model,
one optimizer, one uplink, one downlink receiver) and, for each task, turns it into the
logical client the task is for (`become`): that client's name, seed and token shard,
and its state (`FederatedClient.state_dict()`: optimizer moments and schedule step,
error-feedback residual, the model it holds for delta downlinks). A client that never
trained starts from the state a freshly built client has. After the task, `release`
hands the new state back (Ray's object store) or writes it to a file
(`skyfed.runtime.client_state`), and empties the replica: it keeps its parameter
tensors, but no client's moments, gradients, residual or held model. When the state goes
to a file and the model is large (`LARGE_BYTES`, 64 MiB of trainable fp32 parameters),
two parts of it are written earlier, each beside the state's file, and read
back only when needed: the model the client holds for delta downlinks just before
local training (training does not need it; the update is computed afterwards from the
file), and the optimizer's moments just after (the update does not need them, and their
memory goes back to the system at once when they are large, `skyfed.heap.release_free_memory`). So the held model is not in memory while training's gradients and
activations are, nor the moments while the update's buffers are.

Users: each Ray actor of `runtime: ray` (skyfed.runtime.ray wraps this class in
`ray.remote`; this module imports nothing from Ray), and the in-process simulation with
`simulation.client_state: disk`, where all the clients share one replica
(`ReplicaClient`). A client's computation depends only on its state, shard, seed and
task, so the results are bit-identical to clients that each keep their own model.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from skyfed.config import ExperimentConfig
from skyfed.federation.client import FederatedClient
from skyfed.federation.messages import ClientResult, TrainTask
from skyfed.federation.steps import client_schedules
from skyfed.heap import release_free_memory
from skyfed.model import num_parameters
from skyfed.runtime.client_state import ClientStateFiles, External, load_state, part_path, save_state
from skyfed.runtime.setup import client_seed, device_for, make_client

Step = tuple[str, int, int, float]  # client, step, steps, loss (FederatedClient.on_step)
# A model at least this large (fp32 bytes of its trainable parameters) has its state's parts
# written apart, and freed optimizer moments at least this large go back to the system at
# once. Below it both cost more time (a file each, ~4 ms of malloc_trim) than the memory is
# worth: gpt2-tiny's whole state is 11 MB.
LARGE_BYTES = 64 * 2**20


class ClientReplica:
    """One model replica that plays any logical client (see the module docstring).

    `threads`: torch threads for this process (a Ray actor), None to leave them.
    `initial_path`: where to keep the fresh client's state (its held model is a whole
    model) instead of in memory. `like`: a client whose model this replica's is (its
    LoRA rank, skyfed.lora_ranks); None for a client with the server's rank."""

    def __init__(self, cfg: ExperimentConfig, tokenizer, threads: int | None = 1, initial_path: str | Path | None = None,
                 like: str | None = None):
        if threads is not None:
            torch.set_num_threads(threads)
        self.cfg = cfg
        name = like if like is not None else "replica"
        self.client = make_client(cfg, name, 0, np.zeros(0, dtype=np.int32), tokenizer, device_for(cfg))
        self.fresh: dict[str, Any] | None = copy.deepcopy(self.client.state_dict())  # a client that has not trained yet
        self.initial_path = None if initial_path is None else Path(initial_path)
        if self.initial_path is not None:
            save_state(self.fresh, self.initial_path)
            self.fresh = None
        trainable = (p for p in self.client.trainer.model.parameters() if p.requires_grad)
        self.write_apart = sum(p.numel() * 4 for p in trainable) >= LARGE_BYTES
        self.client.drop_state()
        self.schedule = client_schedules(cfg, num_parameters(self.client.trainer.model))  # per client
        self.steps: list[Step] = []
        self._apart: dict[str, Path] = {}  # parts of the current client's state written apart

    def become(
        self, name: str, index: int, tokens: np.ndarray, state: dict[str, Any] | str | Path | None,
        on_step: Callable[[str, int, int, float], None] | None = None, state_path: str | Path | None = None,
    ) -> FederatedClient:
        """The replica as client `name` (the `index`-th of the config) with `state`: a state,
        a file holding one, or None (never trained). Local steps go to `on_step`, else to
        `self.steps`. `state_path`: the file `release` will write; parts of the state go
        beside it before and after training when the model is large (the module docstring)."""
        client = self.client
        client.name, client.tokens, client.seed = name, tokens, client_seed(self.cfg, index)
        client.trainer.total_steps = self.schedule.get(name, client.trainer.total_steps)
        if isinstance(state, (str, Path)):
            state = load_state(state)  # copy-on-write tensors, ours to train in
        elif state is None and self.initial_path is not None:
            state = load_state(self.initial_path)
        else:  # never train in the fresh state's tensors, nor in buffers the object store shares
            state = copy.deepcopy(self.fresh if state is None else state)
        client.load_state_dict(state)
        del state
        self.steps = []
        client.on_step = on_step if on_step is not None else (lambda *step: self.steps.append(step))
        self._apart = {}
        if state_path is None or not self.write_apart:
            client.before_training = client.after_training = None
        else:
            client.before_training = lambda: self._write_apart("downlink", Path(state_path))
            client.after_training = lambda: self._write_apart("trainer", Path(state_path))
        return client

    def _write_apart(self, part: str, state_path: Path) -> None:
        """Write `part` of the client's state beside `state_path` and let go of it: the
        downlink's held model is then read back from the file, lazily; the optimizer's
        moments are not needed again by this task."""
        path = part_path(state_path, part)
        client = self.client
        if part == "trainer":
            save_state(client.trainer.state_dict(), path)
            moments = client.trainer.optimizer.state
            freed = sum(t.nbytes for s in moments.values() for t in s.values() if isinstance(t, torch.Tensor))
            moments.clear()
            if freed >= LARGE_BYTES:  # two model-sized buffers, which the update's would not reuse
                release_free_memory()
        else:
            save_state(client.downlink.state_dict(), path)
            client.downlink.load_state_dict(load_state(path))
        self._apart[part] = path

    def release(self, state_path: str | Path | None = None) -> dict[str, Any] | None:
        """The current client's state, or None once written to `state_path`; the replica
        keeps none of it."""
        state = self.client.state_dict()
        if state_path is not None:
            for part, path in self._apart.items():
                state[part] = External(path.name)
            save_state(state, state_path)
            state = None
        self.client.drop_state()
        self.client.before_training = self.client.after_training = None
        self._apart = {}
        return state

    def handle(
        self,
        name: str,
        index: int,
        tokens: np.ndarray,
        state: dict[str, Any] | str | None,
        task: TrainTask,
        payload: bytes,
        state_path: str | None = None,
        after: Any = None,
    ) -> tuple[tuple[ClientResult, list[Step]], dict[str, Any] | None]:
        """Ray's call: train client `name` on `task`, whose model bytes come separately as
        `payload` (shared by every client of a round). Returns ((result, local steps), new
        state); the new state is None when it was written to `state_path`. `after` is the
        client's previous result (an ObjectRef, so Ray starts this task only once the
        previous one wrote the state file); its value is not used."""
        client = self.become(name, index, tokens, state, state_path=state_path)
        try:
            result = client.handle(TrainTask(task.round, task.version, payload, task.steps, task.options))
        except BaseException:
            self.client.drop_state()
            raise
        return (result, self.steps), self.release(state_path)

    def configure(self, cfg: ExperimentConfig, tokenizer, threads: int | None = 1) -> int:
        """Become a fresh replica of another run (a kept Ray actor, `ray.keep_actors`);
        returns this process' pid."""
        self.__init__(cfg, tokenizer, threads)
        return os.getpid()

    def pid(self) -> int:
        return os.getpid()

    def peak_rss_bytes(self) -> int:
        """This process' peak resident memory (Linux reports KiB)."""
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class ReplicaClient:
    """A simulated client that owns no model: its state waits in a file between its tasks
    (`ClientStateFiles`), and it trains in the replica that every simulated client shares.
    Its secure-aggregation participant (keys and shares, no tensors of the model's size)
    stays with it, and answers secure aggregation's control messages without the replica."""

    def __init__(self, name: str, index: int, tokens: np.ndarray, replica: ClientReplica, files: ClientStateFiles,
                 secagg: Any = None):
        self.name, self.index, self.tokens = name, index, tokens
        self.replica, self.files = replica, files
        self.secagg = secagg
        self.on_step: Callable[[str, int, int, float], None] | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.tokens)

    def handle(self, task: TrainTask) -> ClientResult:
        if self.secagg is not None and self.secagg.is_control(task):
            return self.secagg.control(task)
        old, path = self.files.current(self.name), self.files.next(self.name)
        client = self.replica.become(self.name, self.index, self.tokens, old, self.on_step, path)
        client.secagg = self.secagg
        try:
            result = client.handle(task)
        except BaseException:
            client.drop_state()
            raise
        finally:
            client.secagg = None
        self.replica.release(path)
        return result
