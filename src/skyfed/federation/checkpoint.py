"""Atomic checkpoints of a run: the global parameters plus a dict of stateful parts.

A checkpoint is a folder `checkpoint/` holding `params-R.safetensors` (the global
model's federated parameters after round R) and `state.pt`, the `state_dict()` of every
registered part by name — the server core (version, totals, strategy, downlink), the
loop (next round, or the asynchronous tasks in flight), the stopwatch, and whatever the
runtime adds: the simulated clients (optimizer moments, error-feedback residuals, the
model each holds), the simulated clock and egress bill, the gRPC client registry. This
is torchtitan's idea of a checkpoint as named `Stateful` parts: each runtime resumes
exactly what it registered.

Each file is written to a temp file, fsynced and renamed; `state.pt` is written last and
names the params file's checksum, so a crash between the two leaves the previous
complete checkpoint readable.
"""

from __future__ import annotations

import io
import logging
import zlib
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from skyfed.errors import CheckpointError
from skyfed.metrics import atomic_write_bytes

log = logging.getLogger(__name__)


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


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


class Checkpointer:
    """Saves and restores the server core's parameters and a dict of named parts."""

    def __init__(self, folder: Path, core: Any):
        self.folder = Path(folder)
        self.core = core  # skyfed.federation.server.ServerCore
        self.parts: dict[str, Stateful] = {}

    def exists(self) -> bool:
        return (self.folder / "state.pt").exists()

    def save(self, round: int) -> None:
        state = {
            "round": round,
            "server": self.core.state_dict(),
            "parts": {name: part.state_dict() for name, part in self.parts.items()},
        }
        save_checkpoint(self.folder, self.core.params, state)

    def load(self) -> tuple[int, set[str]]:
        """Restore everything saved; returns (last complete round, names of the parts restored)."""
        params, state = load_checkpoint(self.folder)
        self.core.load_state_dict(state["server"], params)
        saved = state.get("parts", {})
        restored = set()
        for name, part in self.parts.items():
            if name in saved:
                part.load_state_dict(saved[name])
                restored.add(name)
            else:
                log.warning("checkpoint %s has no state for %r: it starts afresh", self.folder, name)
        return int(state["round"]), restored
