"""Files that hold one client's state between its rounds (optimizer moments, error-feedback
residual, the model it holds for delta downlinks).

The tensors go into a safetensors file; the rest of the tree (dict keys, which may be
ints, numbers, tuples, None) is pickled into the file's metadata with each tensor
replaced by its key. safetensors writes several times faster than `torch.save` and reads
without unpickling tensor storage, which is most of the per-client cost of the Ray
runtime with `ray.client_state: disk` (bench/scale.py). The files are written and read by
the same run only (the skeleton is a pickle: never load a state file from elsewhere).
Writes are atomic: a temporary file, then a rename.
"""

from __future__ import annotations

import base64
import os
import pickle
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

SKELETON = "skyfed.skeleton"


class _TensorRef:
    """Where a tensor was in the tree: its key in the safetensors file."""

    __slots__ = ("key",)

    def __init__(self, key: str):
        self.key = key


def _strip(node: Any, tensors: dict[str, torch.Tensor], seen: set[int]) -> Any:
    if isinstance(node, torch.Tensor):
        key = str(len(tensors))
        t = node.detach().cpu()
        # safetensors refuses tensors that share memory: the second of a pair gets a copy
        ptr = t.untyped_storage().data_ptr() if t.numel() else -1
        tensors[key] = t.contiguous().clone() if ptr in seen else t.contiguous()
        if ptr != -1:
            seen.add(ptr)
        return _TensorRef(key)
    if isinstance(node, dict):
        return {k: _strip(v, tensors, seen) for k, v in node.items()}
    if isinstance(node, (list, tuple)):
        return type(node)(_strip(v, tensors, seen) for v in node)
    return node


def _fill(node: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(node, _TensorRef):
        return tensors[node.key]
    if isinstance(node, dict):
        return {k: _fill(v, tensors) for k, v in node.items()}
    if isinstance(node, (list, tuple)):
        return type(node)(_fill(v, tensors) for v in node)
    return node


def save_state(state: dict[str, Any], path: str) -> None:
    """Write a client's state to `path` atomically (a temporary file, then a rename)."""
    tensors: dict[str, torch.Tensor] = {}
    skeleton = _strip(state, tensors, set())
    meta = {SKELETON: base64.b64encode(pickle.dumps(skeleton)).decode("ascii")}
    tmp = f"{path}.tmp{os.getpid()}"
    save_file(tensors, tmp, metadata=meta)
    os.replace(tmp, path)


def load_state(path: str) -> dict[str, Any]:
    """Read a state written by `save_state`: fresh tensors, the caller's to train in."""
    with safe_open(path, framework="pt") as f:
        skeleton = pickle.loads(base64.b64decode(f.metadata()[SKELETON]))
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    return _fill(skeleton, tensors)
