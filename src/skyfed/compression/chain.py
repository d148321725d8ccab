"""A chain of codecs applied to a dict of named tensors.

Codec i encodes the carry of codec i - 1 (the first codec encodes the flat tensor).
Parts are stored in the safetensors blob as ``"{tensor}::{i}.{part}"``; a codec's carry
is stored only when the chain ends there. Decoding runs the validation of every stage
first (names, dtypes, shapes, index ranges), then the stages backwards.
"""

from __future__ import annotations

from typing import Any

import torch

from skyfed.compression.codecs import Codec, build_chain_codecs, check_chain_order
from skyfed.compression.wire import TensorSpec, all_finite
from skyfed.errors import WireFormatError

SEP = "::"


class Chain:
    def __init__(self, codecs: list[Codec]):
        check_chain_order(codecs)
        self.codecs = list(codecs)

    @classmethod
    def from_specs(cls, specs: list[Any] | None) -> "Chain":
        return cls(build_chain_codecs(specs))

    def __bool__(self) -> bool:
        return bool(self.codecs)

    def __repr__(self) -> str:
        return f"Chain({[c.spec() for c in self.codecs]})"

    @property
    def lossless(self) -> bool:
        return all(c.lossless for c in self.codecs)

    def specs(self) -> list[dict[str, Any]]:
        return [c.spec() for c in self.codecs]

    def salted(self, salt: int) -> "Chain":
        return Chain([c.salted(salt) for c in self.codecs])

    def for_round(self, round: int) -> "Chain":
        """The chain for one round's messages (a first codec may depend on the round)."""
        if not self.codecs or not hasattr(self.codecs[0], "for_round"):
            return self
        return Chain([self.codecs[0].for_round(round), *self.codecs[1:]])

    def for_shape(self, shape: tuple[int, ...]) -> list[Codec]:
        """The codecs for one tensor of `shape` (the first codec may depend on it)."""
        return [self.codecs[0].for_shape(tuple(shape)), *self.codecs[1:]] if self.codecs else []

    def nbytes(self, n: int, shape: tuple[int, ...] | None = None) -> int:
        """Encoded bytes of one tensor of `n` values (per-tensor scope), by the formulas."""
        total = 0
        for c in self.for_shape(shape or (n,)):
            total += c.nbytes(n)
            n = c.carry_numel(n)
        return total + 4 * n  # an unencoded carry travels as float32

    # ------------------------------------------------------------ encode

    def encode(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if not self.codecs:
            return {k: v.to(torch.float32) for k, v in tensors.items()}
        out: dict[str, torch.Tensor] = {}
        flats = {k: v.reshape(-1) for k, v in tensors.items()}
        hints = self.codecs[0].prepare(flats)
        for key, x in flats.items():
            for i, c in enumerate(self.for_shape(tensors[key].shape)):
                parts = c.encode(x, key, hints.get(key) if i == 0 else None)
                carry = parts.pop(c.carry) if c.carry is not None else None
                out.update({f"{key}{SEP}{i}.{p}": t for p, t in parts.items()})
                if carry is None:
                    break
                x = carry
            else:
                out[f"{key}{SEP}{len(self.codecs) - 1}.{self.codecs[-1].carry}"] = x
        return out

    # ------------------------------------------------------------ decode

    def decode(
        self, parts: dict[str, torch.Tensor], expected: dict[str, TensorSpec], what: str
    ) -> dict[str, torch.Tensor]:
        """Validate every part against `expected`, then decode; WireFormatError if anything is off."""
        if not self.codecs:
            return parts
        grouped: dict[str, dict[int, dict[str, torch.Tensor]]] = {}
        for full, t in parts.items():
            key, sep, rest = full.rpartition(SEP)
            stage, dot, part = rest.partition(".")
            digits = stage.isascii() and stage.isdigit() and len(stage) <= 2
            if not sep or not dot or not digits or key not in expected or int(stage) >= len(self.codecs):
                raise WireFormatError(f"{what}: unexpected encoded tensor {full[:120]!r}")
            grouped.setdefault(key, {}).setdefault(int(stage), {})[part] = t
        missing = sorted(set(expected) - set(grouped))
        if missing:
            raise WireFormatError(f"{what}: missing encoded tensors for {missing[:3]}{'...' if len(missing) > 3 else ''}")
        out: dict[str, torch.Tensor] = {}
        last = len(self.codecs) - 1
        for key, spec in expected.items():
            stages = grouped[key]
            sizes, n = [], int(torch.Size(spec.shape).numel())
            codecs = self.for_shape(spec.shape)
            for i, c in enumerate(codecs):  # validate forward
                where = f"{what}: tensor {key!r} ({c.name})"
                p = stages.get(i, {})
                allowed = set(self._part_names(c, i == last))
                if set(p) != allowed:
                    sent = [name[:20] for name in sorted(p)[:6]] + (["..."] if len(p) > 6 else [])
                    raise WireFormatError(f"{where}: encoded parts {sent}, expected {sorted(allowed)}")
                sizes.append(n)
                n = c.check(p, n, where)
            if self.codecs[-1].carry is not None:
                name = self.codecs[-1].carry
                value = stages[last][name]
                if value.dtype != torch.float32 or tuple(value.shape) != (n,):
                    raise WireFormatError(f"{what}: tensor {key!r}: part {name!r} is {value.dtype} {tuple(value.shape)}, expected float32 ({n},)")
                if not all_finite(value):
                    raise WireFormatError(f"{what}: tensor {key!r} contains NaN or Inf values")
            else:
                value = None
            for i in range(last, -1, -1):  # decode backward
                c = codecs[i]
                p = dict(stages.get(i, {}))
                if c.carry is not None:
                    p[c.carry] = value
                value = c.decode(p, sizes[i], key, f"{what}: tensor {key!r} ({c.name})")
            out[key] = value.view(spec.shape)
        return out

    @staticmethod
    def _part_names(c: Codec, is_last: bool) -> list[str]:
        return list(c.part_names) + ([c.carry] if is_last and c.carry else [])
