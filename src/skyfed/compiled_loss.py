"""`torch.compile` of local training's forward, falling back to eager cleanly.

`train.compile`: `on`, `off`, or `auto` = on for CUDA, off on CPU. Why off on CPU: on
the 2-core machine (1 thread, while loaded) bench/trainer_speed.py measured gpt2-tiny
at batch 16 x 128 about 1.3x the tokens per CPU-second compiled, but the first compile
in a process with a cold Inductor cache took about a minute. That pays off only in long
runs: every short run (tests, smoke runs) and every process that trains (`skyfed
client`, each Ray actor) pays the compile, it needs a C++ compiler, and compiled kernels
round differently from eager, so results would stop being bit-identical to eager runs.
Also, Inductor's CPU kernels are OpenMP loops: with 2 threads on a machine that other
work keeps busy, a compiled gpt2-tiny step (batch 4 x 32) took about 2 s against 0.3 s
eager (with 1 thread: 0.05 s), so compiled CPU training wants idle cores or `threads=1`.
Long CPU runs can ask for `on`; bench/results/trainer_speed.json holds the idle figures.

`StepRunner(model, enabled).run(step)` calls `step(forward)`, where `forward` is
`torch.compile(model)` (Ansel et al. 2024, "PyTorch 2", ASPLOS; TorchDynamo + Inductor)
when enabled, else `model` itself; `step` does the forward, the backward and nothing
else, so a failure leaves the optimizer untouched. Compiling happens at the first call
(the backward's graph at the first backward). If anything in the compiled path raises,
one warning line goes to the log (once per process), compile is off for the rest of the
process (no other client tries again), and the step is redone eagerly, which then is
exactly an eager step. A real error (bad data, out of memory) raises again from eager.
The compiled module shares the model's parameters: state dicts and names do not change.
"""

from __future__ import annotations

import logging
from typing import Callable

import torch

log = logging.getLogger(__name__)

BACKEND: str | Callable = "inductor"  # torch.compile's backend (tests swap in one that fails)
_broken: str | None = None  # why compiling failed in this process, once it has


def compile_enabled(setting: str, device: torch.device) -> bool:
    """Whether `train.compile` = `setting` compiles on `device` (and compile has not failed)."""
    if setting == "off" or (setting == "auto" and device.type != "cuda"):
        return False
    return _broken is None


def _describe(exc: BaseException) -> str:
    """`Type: first line` of `exc` and of its root cause (torch wraps a backend's error)."""
    parts, seen = [], exc
    while seen is not None:
        text = str(seen).strip()
        parts.append(f"{type(seen).__name__}: {text.splitlines()[0] if text else ''}")
        inner = getattr(seen, "inner_exception", None) or seen.__cause__  # dynamo keeps it in the first
        seen = inner if inner is not seen else None
    return parts[0] if len(parts) == 1 else f"{parts[0]} ... {parts[-1]}"


def _give_up(exc: BaseException) -> None:
    global _broken
    first = _broken is None
    _broken = _describe(exc)
    if first:
        log.warning("torch.compile failed, training eagerly from now on (%s)", _broken[:400])


class StepRunner:
    """Runs training steps through the compiled model while that works, else eagerly."""

    def __init__(self, model: torch.nn.Module, enabled: bool):
        self.model = model
        self.compiled: Callable | None = None
        if enabled:
            try:
                self.compiled = torch.compile(model, backend=BACKEND)
            except Exception as exc:  # e.g. a Python version torch.compile does not support
                _give_up(exc)

    @property
    def compiling(self) -> bool:
        return self.compiled is not None and _broken is None

    def run(self, step: Callable[[Callable], torch.Tensor]) -> torch.Tensor:
        """`step(forward)` through the compiled model, or eagerly (see the module docstring)."""
        if self.compiling:
            try:
                return step(self.compiled)
            except Exception as exc:
                _give_up(exc)
                self.compiled = None
        return step(self.model)
