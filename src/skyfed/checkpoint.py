"""Atomic checkpoints of all server state after every round.

A checkpoint is a folder `checkpoint/` holding `params.safetensors` (the global model's
federated parameters) and `state.pt` (round, model version, strategy state, RNG state,
anything else the engine registers). Each file is written to a temp file, fsynced and
renamed; `state.pt` is written last and names the params file's checksum, so a crash
between the two leaves the previous complete checkpoint readable.
"""

from __future__ import annotations

import io
import zlib
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from skyfed.errors import CheckpointError
from skyfed.metrics import atomic_write_bytes


def save_checkpoint(folder: Path, params: dict[str, torch.Tensor], state: dict[str, Any]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    blob = st_save({n: t.contiguous() for n, t in params.items()})
    name = f"params-{state['round']}.safetensors"
    atomic_write_bytes(folder / name, blob)
    buf = io.BytesIO()
    torch.save({**state, "params_file": name, "params_crc32": zlib.crc32(blob)}, buf)
    atomic_write_bytes(folder / "state.pt", buf.getvalue())
    for old in folder.glob("params-*.safetensors"):
        if old.name != name:
            old.unlink(missing_ok=True)


def load_checkpoint(folder: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    state_path = folder / "state.pt"
    if not state_path.exists():
        raise CheckpointError(f"no checkpoint to resume from in {folder}")
    try:
        state = torch.load(state_path, weights_only=False)
        blob = (folder / state["params_file"]).read_bytes()
    except Exception as exc:
        raise CheckpointError(f"cannot read checkpoint {state_path}: {exc}") from None
    if zlib.crc32(blob) != state["params_crc32"]:
        raise CheckpointError(f"checkpoint {folder / state['params_file']} is corrupt (checksum mismatch)")
    return st_load(blob), state
