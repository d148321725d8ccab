"""The two directions of a federation link, with their codec chains and state.

* `Uplink` (client -> server): a client's update through the uplink chain, with the
  client's persistent error-feedback residual (on by default for lossy chains).
* `Downlink` (server -> clients): the global model through the downlink chain. In delta
  mode (the default for a non-empty chain) a client known to hold a model receives only
  the change since that model. The server keeps, per distinct client state, exactly the
  tensors the client reconstructed (``held``), and sends ``params - held``: whatever a
  lossy codec dropped last time is part of the next delta, so the bookkeeping is itself
  the server-side error feedback and the clients never drift. Clients with the same
  state share one encoding. A client meeting the server for the first time (or after a
  failure) gets the whole model through the chain's dense codecs only (casts and
  quantizers; sparsifiers are skipped, since a sparse model is useless) -- except for
  the version-0 model: every client builds the same initial model from the experiment
  seed, so the first delta is taken against it (state tag 0), with a CRC-32 of the
  initial tensors in the header that the client checks before applying anything; a
  client whose initial model differs refuses, and gets the whole model next round.
  A state no client holds any more is dropped as soon as its last client moves on, and
  the initial model once every client of the run (`clients`, when known) has been met.
* `DownlinkReceiver` (client side): decodes a model or a delta and applies it to the
  model it holds, refusing a delta against a state it does not hold or one that would
  leave a value non-finite or above `wire.MAX_ABS`.
"""

from __future__ import annotations

import logging
import zlib
from typing import Any

import torch

from skyfed.compression.chain import Chain
from skyfed.compression.codecs import mix_seed
from skyfed.compression.feedback import ErrorFeedback
from skyfed.compression.payload import decode_payload, pack_parts
from skyfed.compression.wire import TensorSpec, value_error
from skyfed.errors import WireFormatError

log = logging.getLogger(__name__)


def fp32_bytes(spec: dict[str, TensorSpec]) -> int:
    """Bytes of the same tensors as plain float32 (the compression ratio's numerator)."""
    return sum(4 * int(torch.Size(s.shape).numel()) for s in spec.values())


def tensors_crc(tensors: dict[str, torch.Tensor]) -> int:
    """CRC-32 of the tensors' fp32 bytes, in name order."""
    crc = 0
    for name in sorted(tensors):
        crc = zlib.crc32(tensors[name].detach().to(torch.float32).contiguous().cpu().numpy().tobytes(), crc)
    return crc


class Uplink:
    def __init__(self, chain: Chain | None = None, error_feedback: bool = True, residual_in_model: bool = False):
        self.chain = chain or Chain([])
        lossy = bool(self.chain) and not self.chain.lossless
        self.feedback = ErrorFeedback(residual_in_model) if (error_feedback and lossy) else None

    @classmethod
    def from_config(cls, cfg: Any | None) -> "Uplink":
        if cfg is None:
            return cls()
        return cls(Chain.from_specs(cfg.uplink), cfg.error_feedback, cfg.residual_in_model)

    def start_point(self, params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The model to train from (see ErrorFeedback.start_point)."""
        return params if self.feedback is None else self.feedback.start_point(params)

    def encode(
        self, tensors: dict[str, torch.Tensor], salt: int, from_start_point: bool = False, consume: bool = False,
        **header: Any,
    ) -> bytes:
        """`from_start_point`: `tensors` is the change from `start_point(...)`, which
        already holds the residual when it lives in the model. `consume`: `tensors` is
        the caller's to give away (ErrorFeedback.encode), which saves memory."""
        chain = self.chain.salted(salt).for_round(int(header.get("round", 0)))
        if self.feedback is not None:
            compensate = not (from_start_point and self.feedback.in_model)
            parts, _ = self.feedback.encode(tensors, chain, compensate, consume=consume)
        else:
            parts = chain.encode(tensors)
        return pack_parts(parts, chain, **header)


class Downlink:
    def __init__(self, chain: Chain | None, spec: dict[str, TensorSpec], delta: bool = True):
        self.chain = chain or Chain([])
        self.spec = spec
        self.delta = delta and bool(self.chain)
        self.first_chain = Chain([c for c in self.chain.codecs if c.carry is None]) if self.delta else self.chain
        self.held: dict[int, dict[str, torch.Tensor]] = {}  # state tag -> what those clients hold
        self.client_tag: dict[str, int] = {}
        self.next_tag = 1
        self.met: set[str] = set()  # clients that already got a payload
        self.initial_crc: int | None = None
        self.clients: set[str] | None = None  # every client of the run, when known (the engine sets it)
        self._cache: dict[int | None, tuple[bytes, int | None]] = {}

    @classmethod
    def from_config(cls, cfg: Any | None, spec: dict[str, TensorSpec]) -> "Downlink":
        if cfg is None:
            return cls(None, spec)
        return cls(Chain.from_specs(cfg.downlink), spec, cfg.downlink_delta)

    def payload_for(self, client: str, params: dict[str, torch.Tensor], round: int, version: int) -> bytes:
        """The bytes that bring `client` to (approximately, exactly tracked) `params`."""
        base = self.client_tag.get(client) if self.delta else None
        if self.delta and base is None and client not in self.met and (version == 0 or 0 in self.held):
            base = 0  # the client built the same initial model from the seed
            if 0 not in self.held:  # first payload of a fresh run: params are the version-0 model
                self.held[0] = {n: t.to(torch.float32).clone() for n, t in params.items()}
                self.initial_crc = tensors_crc(self.held[0])
        self.met.add(client)
        if base not in self._cache:
            self._cache[base] = self._encode(base, params, round, version)
        payload, tag = self._cache[base]
        if tag is not None:
            self.client_tag[client] = tag
            self._drop_unused(base)
        return payload

    def _initial_needed(self) -> bool:
        """Whether a client may still ask for its first model (a delta from state 0)."""
        return self.clients is None or not self.clients <= self.met

    def _drop_unused(self, tag: int | None) -> None:
        """Forget the model of state `tag` when no client holds it any more (its payload
        stays cached for this version)."""
        if tag is None or tag not in self.held or (tag == 0 and self._initial_needed()):
            return
        if tag == 0 or tag not in self.client_tag.values():
            del self.held[tag]

    def _encode(self, base: int | None, params: dict[str, torch.Tensor], round: int, version: int) -> tuple[bytes, int | None]:
        if base is None:
            chain, tensors, kind = self.first_chain, params, "model"
        else:
            held = self.held[base]
            chain, tensors, kind = self.chain, {n: params[n] - held[n] for n in params}, "model_delta"
        chain = chain.salted(mix_seed(round, base or 0)).for_round(round)
        parts = chain.encode(tensors)
        del tensors  # the change is encoded: its buffer can go before the decoded copy comes
        tag = None
        if self.delta:
            sent = chain.decode(parts, self.spec, "downlink") if chain else {n: t.to(torch.float32).clone() for n, t in parts.items()}
            tag, self.next_tag = self.next_tag, self.next_tag + 1
            if base is not None:  # the new state, one tensor at a time
                sent = {n: self.held[base][n] + sent.pop(n) for n in list(sent)}
            self.held[tag] = sent
        header = dict(kind=kind, round=round, version=version, base_tag=base, tag=tag)
        if base == 0:
            header["base_crc"] = self.initial_crc
        return pack_parts(parts, chain, **header), tag

    def state_dict(self) -> dict[str, Any]:
        return {"held": self.held, "client_tag": dict(self.client_tag), "next_tag": self.next_tag,
                "met": sorted(self.met), "initial_crc": self.initial_crc}

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        self.held, self.client_tag, self.next_tag = saved["held"], dict(saved["client_tag"]), saved["next_tag"]
        self.met, self.initial_crc = set(saved["met"]), saved["initial_crc"]
        self.settle([], [])

    def settle(self, selected: list[str], succeeded: list[str]) -> None:
        """End of a round: forget clients whose state is uncertain; drop unused states."""
        for client in set(selected) - set(succeeded):
            if self.client_tag.pop(client, None) is not None:
                log.info("downlink: %s will receive the whole model next time", client)
        live = set(self.client_tag.values())
        if self._initial_needed():
            live.add(0)  # the initial model, for clients not met yet
        self.held = {t: h for t, h in self.held.items() if t in live}
        self._cache = {}


class DownlinkReceiver:
    def __init__(self, initial: dict[str, torch.Tensor] | None = None) -> None:
        """`initial`: this client's own initial model (state tag 0), if it built one."""
        self.held: dict[str, torch.Tensor] | None = initial
        self.tag: int | None = 0 if initial is not None else None
        self._initial_crc: int | None = None

    def state_dict(self) -> dict[str, Any]:
        return {"held": self.held, "tag": self.tag, "initial_crc": self._initial_crc}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.held, self.tag, self._initial_crc = state["held"], state["tag"], state["initial_crc"]

    def receive(
        self, payload: bytes, spec: dict[str, TensorSpec], max_bytes: int | None, what: str = "global model"
    ) -> dict[str, torch.Tensor]:
        tensors, header = decode_payload(payload, spec, max_bytes, what)
        if header.get("kind") == "model_delta":
            base = header.get("base_tag")
            if self.held is None or base != self.tag:
                raise WireFormatError(f"{what}: a change against model state {base}, but this client holds state {self.tag}")
            if base == 0:
                if self._initial_crc is None:
                    self._initial_crc = tensors_crc(self.held)
                if header.get("base_crc") != self._initial_crc:
                    self.held, self.tag = None, None
                    raise WireFormatError(f"{what}: this client's initial model differs from the server's (seed, model or library versions)")
            params = {n: self.held[n] + tensors[n] for n in tensors}
            for n, t in params.items():  # a change may not push the model out of bounds
                problem = value_error(t)
                if problem is not None:
                    raise WireFormatError(f"{what}: applying the change leaves tensor {n!r} that {problem}")
        else:
            params = tensors
        self.held, self.tag = (params, header["tag"]) if header.get("tag") is not None else (None, None)
        return params
