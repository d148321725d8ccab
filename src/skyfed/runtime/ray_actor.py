"""One Ray actor of the Ray runtime: a model replica that trains many logical clients in turn.

The actor builds one `FederatedClient` with the project's `make_client` (one model, one
optimizer, one uplink, one downlink receiver) and, for each task, turns it into the
logical client the task is for: that client's name, seed and token shard, and its
state (`FederatedClient.state_dict()`: optimizer moments and schedule step,
error-feedback residual, the model it holds for delta downlinks). A client that never
trained starts from the state a freshly built client has. After `handle`, the client's
new state goes back to the object store (returned) or to a file (written here,
`skyfed.runtime.state_files`: safetensors plus the tree's skeleton).

This module imports nothing from Ray: `skyfed.runtime.ray` wraps `ClientReplica` in
`ray.remote`, so the class is also usable, and testable, without a cluster.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from skyfed.config import ExperimentConfig
from skyfed.federation.messages import ClientResult, TrainTask
from skyfed.runtime.state_files import load_state, save_state

Step = tuple[str, int, int, float]  # client, step, steps, loss (FederatedClient.on_step)


class ClientReplica:
    """One model replica that plays any logical client (see the module docstring)."""

    def __init__(self, cfg: ExperimentConfig, tokenizer, threads: int = 1):
        from skyfed.runtime.setup import device_for, make_client

        torch.set_num_threads(threads)  # a parallel worker: its CPU share, 1 by default (setup.apply_threads)
        self.cfg = cfg
        self.client = make_client(cfg, "replica", 0, np.zeros(0, dtype=np.int32), tokenizer, device_for(cfg))
        self.fresh = copy.deepcopy(self.client.state_dict())  # a client that has not trained yet
        self.steps: list[Step] = []
        self.client.on_step = lambda *step: self.steps.append(step)

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
        """Train client `name` (the `index`-th of the config) on `task`, whose model bytes
        come separately as `payload` (shared by every client of a round). `state` is the
        client's state, a file holding it, or None (never trained). Returns ((result, local
        steps), new state); the new state is None when it was written to `state_path`.
        `after` is the client's previous result (an ObjectRef, so Ray starts this task
        only once the previous one wrote the state file); its value is not used."""
        client = self.client
        client.name, client.tokens, client.seed = name, tokens, self.cfg.seed * 1000 + index
        if isinstance(state, str):
            state = load_state(state)  # fresh tensors, ours to train in
        else:  # never train in the fresh state's tensors, nor in buffers the object store shares
            state = copy.deepcopy(self.fresh if state is None else state)
        client.load_state_dict(state)
        self.steps = []
        result = client.handle(TrainTask(task.round, task.version, payload, task.steps, task.options))
        new_state = client.state_dict()
        if state_path is not None:
            Path(state_path).parent.mkdir(parents=True, exist_ok=True)
            save_state(new_state, state_path)
            new_state = None
        return (result, self.steps), new_state

    def pid(self) -> int:
        return os.getpid()

    def peak_rss_bytes(self) -> int:
        """This actor process' peak resident memory (Linux reports KiB)."""
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
