"""Simulated clients' state between their tasks, in files: the format and the bookkeeping.

A client's state (`FederatedClient.state_dict()`: AdamW moments and schedule step, the
error-feedback residual, the model it holds for delta downlinks) is a nested dict of
tensors and plain values. `save_state` writes it as one safetensors file: the tensors
as the file's tensors, the nesting and the plain values as JSON in its metadata.
`load_state` maps the file (safetensors' copy-on-write mmap): a tensor is read from
disk when touched, and becomes private memory only where it is written to, so loading
a state costs no second copy and never changes the file.

A part of a state can be written apart, earlier, and the state then names it
(`External`): a replica writes the held model to NAME.G.downlink.safetensors before
local training and the optimizer's moments to NAME.G.trainer.safetensors after it, and
lets go of them in between (skyfed.runtime.replica).

`ClientStateFiles` names the files. Each task of a client writes a new, immutable file
ROOT/NAME.G.safetensors (G counts the client's tasks), so the files a checkpoint names
are never overwritten by later rounds; a checkpoint deletes the files that neither it
nor the previous checkpoint names (the previous one is still the valid checkpoint until
the new one is written). Used by the in-process simulation
(`simulation.client_state: disk`) and the Ray runtime (`ray.client_state: disk`), both
with ROOT = RUN_DIR/clients.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from skyfed.errors import CheckpointError
from skyfed.libc import sync_filesystem

_META_KEY = "skyfed.state"
_GENERATION = re.compile(r"^(?P<client>.+)\.(?P<gen>\d+)\.safetensors$")
_STATE_FILE = re.compile(r"^.+\.\d+(\.[a-z]+)?\.safetensors(\.tmp\d+)?$")  # a state, a part of one, or half of either
PARTS = ("downlink", "trainer")  # parts of a state that may be written apart, before the rest (ClientReplica)


class External:
    """Stands for a part of a state written earlier to the file `name`, beside this one."""

    def __init__(self, name: str):
        self.name = name


def part_path(path: str | Path, part: str) -> Path:
    """Where the part `part` of the state file `path` (NAME.G.safetensors) is written apart:
    NAME.G.PART.safetensors."""
    path = Path(path)
    return path.with_name(f"{path.name.removesuffix('.safetensors')}.{part}.safetensors")


def _flatten(obj: Any, tensors: dict[str, torch.Tensor], seen: dict[int, str], storages: set[int]) -> Any:
    """`obj` as JSON: tensors become {"T": key} (stored in `tensors`); dicts {"D": ...}
    or, with keys that are not strings, {"M": [[key, value], ...]}; lists {"L": ...},
    tuples {"U": ...}; None, bools, numbers and strings stay themselves."""
    if isinstance(obj, External):
        return {"F": obj.name}
    if isinstance(obj, torch.Tensor):
        if id(obj) in seen:  # the same tensor twice: stored once, the same tensor again on load
            return {"T": seen[id(obj)]}
        key = str(len(tensors))
        t = obj.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        ptr = t.untyped_storage().data_ptr()
        if not t.is_contiguous() or (ptr in storages and t.numel() > 0):  # a view into a shared buffer
            t = t.contiguous().clone()
        storages.add(ptr)
        tensors[key], seen[id(obj)] = t, key
        return {"T": key}
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj):
            return {"D": {k: _flatten(v, tensors, seen, storages) for k, v in obj.items()}}
        return {"M": [[_flatten(k, tensors, seen, storages), _flatten(v, tensors, seen, storages)] for k, v in obj.items()]}
    if isinstance(obj, list):
        return {"L": [_flatten(v, tensors, seen, storages) for v in obj]}
    if isinstance(obj, tuple):
        return {"U": [_flatten(v, tensors, seen, storages) for v in obj]}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot store a {type(obj).__name__} in a client state file")


def _unflatten(node: Any, tensors: dict[str, torch.Tensor], folder: Path) -> Any:
    if not isinstance(node, dict):
        return node
    (kind, value), = node.items()
    if kind == "T":
        return tensors[value]
    if kind == "F":  # a part written apart, in a file beside this one
        if Path(value).name != value:
            raise CheckpointError(f"a client state file names {value!r}, not a file beside it")
        return load_state(folder / value)
    if kind == "D":
        return {k: _unflatten(v, tensors, folder) for k, v in value.items()}
    if kind == "M":
        return {_unflatten(k, tensors, folder): _unflatten(v, tensors, folder) for k, v in value}
    if kind == "L":
        return [_unflatten(v, tensors, folder) for v in value]
    if kind == "U":
        return tuple(_unflatten(v, tensors, folder) for v in value)
    raise CheckpointError(f"unknown node {kind!r} in a client state file")


def save_state(state: Any, path: str | Path) -> None:
    """Write a client's state (or a part of one) as one safetensors file, atomically (temp
    file, rename: a reader, or a run resumed after the process was killed, sees the whole
    file or none). It is not flushed to disk here: `ClientStateFiles.state_dict` flushes
    every file a checkpoint names, in one call, before the checkpoint names it. An
    `External` value stands for a part already written apart."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    skeleton = json.dumps(_flatten(state, tensors, {}, set()))
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    save_file(tensors, str(tmp), metadata={_META_KEY: skeleton})
    os.replace(tmp, path)


def load_state(path: str | Path) -> Any:
    """A state written by `save_state`, with the parts written apart read back in; its
    tensors map the files copy-on-write."""
    from safetensors import safe_open

    path = Path(path)
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if _META_KEY not in meta:
        raise CheckpointError(f"{path} is not a client state file")
    return _unflatten(json.loads(meta[_META_KEY]), load_file(str(path)), path.parent)


def generation(name: str | None) -> int:
    """G of a state file `NAME.G.safetensors`, 0 for None (a client that never trained)."""
    if name is None:
        return 0
    m = _GENERATION.match(Path(name).name)
    if m is None:
        raise CheckpointError(f"{name} is not a client state file name (NAME.G.safetensors)")
    return int(m["gen"])


class ClientStateFiles:
    """Which file holds each client's latest state, under `root` (module docstring)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self._files: dict[str, str] = {}  # client -> its latest state file's name
        self._written: set[str] = set()  # files written and not yet deleted
        self._named_before: set[str] = set()  # files the previous checkpoint names

    def current(self, client: str) -> Path | None:
        """The file holding `client`'s latest state; None if it never trained."""
        name = self._files.get(client)
        return None if name is None else self.root / name

    def next(self, client: str) -> Path:
        """A new file for `client`'s next state (from now on its latest)."""
        name = f"{client}.{generation(self._files.get(client)) + 1}.safetensors"
        self._files[client] = name
        self._written.add(name)
        return self.root / name

    def state_dict(self) -> dict[str, str]:
        """The files this checkpoint names (client -> file name), flushed to disk (one
        `syncfs` for all of them: a state file is not flushed when written); files that
        neither it nor the previous checkpoint names are deleted."""
        named = dict(self._files)
        if named and self.root.is_dir():
            sync_filesystem(self.root)
        keep = set(named.values()) | self._named_before
        for stale in self._written - keep:
            self._delete(stale)
        self._written &= keep
        self._named_before = set(named.values())
        return named

    def load_state_dict(self, named: dict[str, str]) -> None:
        """Resume from a checkpoint's files; state files it does not name (written after it,
        or half-written when the run stopped) are deleted."""
        missing = [f for f in named.values() if not (self.root / f).is_file()]
        if missing:
            raise CheckpointError(f"--resume: client state file {self.root / missing[0]} is missing")
        self._files = dict(named)
        self._written, self._named_before = set(named.values()), set(named.values())
        if self.root.is_dir():
            keep = self._written | {part_path(name, part).name for name in self._written for part in PARTS}
            for p in self.root.iterdir():
                if _STATE_FILE.match(p.name) is not None and p.name not in keep:
                    p.unlink(missing_ok=True)

    def _delete(self, name: str) -> None:
        for path in (self.root / name, *(part_path(self.root / name, part) for part in PARTS)):
            path.unlink(missing_ok=True)
