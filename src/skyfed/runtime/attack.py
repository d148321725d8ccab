"""Make chosen clients of a SIMULATION misbehave (the `attack:` section), to test defences.

    attack: {clients: [gcp], kind: sign_flip | scale | noise | alie | junk_data, factor: K}

Only `skyfed run` reaches this module (two hooks in runtime/simulation.py). `skyfed
server` and `skyfed client` refuse a config with an active attack section
(`skyfed.config.refuse_attack`), and the gRPC client never imports it.

- junk_data: `apply_junk_data` replaces each attacker's token shard, before its client
  is built, by as many uniformly random token ids (seeded by attack.seed or the
  experiment seed and the client's index). The client then trains honestly on junk.
- every other kind: `AttackTransport` wraps the simulation's transport. Each time the
  engine receives, the results pending in the transport that it has not yet seen (all
  of a synchronous round's results; in an asynchronous run, those sent since the last
  receive) are examined: the honest ones are decoded (as the server would decode them)
  and remembered, the latest per honest client; each attacker's payload is decoded, its
  delta replaced by the malicious one (`skyfed.federation.attacks`), and re-encoded with
  the codec chain recorded in its own header, so compression applies as it would for a
  real client (without error feedback). ALIE's statistics are the latest honest update
  of every honest client: exactly the round's honest updates in a synchronous round (the
  attackers are omniscient, as in the paper's strongest setting). The attacker keeps its
  claimed token count. The simulated upload time and egress bill were computed from the
  honest payload (the same size for plain fp32 and fixed-size codecs).

Relies on the simulated transports' `settle()` and their `_queue` of pending results.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from skyfed.compression.chain import Chain
from skyfed.compression.payload import decode_payload, pack_parts
from skyfed.compression.wire import TensorSpec, read_header
from skyfed.config import AttackConfig, ExperimentConfig
from skyfed.errors import SkyfedError
from skyfed.federation import attacks
from skyfed.federation.messages import ClientResult, TrainTask
from skyfed.federation.transport import Transport

log = logging.getLogger(__name__)

Params = dict[str, torch.Tensor]
_FRAMING = ("format", "blob_bytes", "crc32", "codecs")


def attack_seed(cfg: ExperimentConfig) -> int:
    return cfg.attack.seed if cfg.attack.seed is not None else cfg.seed


def apply_junk_data(cfg: ExperimentConfig, data: Any) -> Any:
    """`data` (PreparedData) with each attacker's shard replaced by random token ids, if
    the attack is junk_data; otherwise unchanged."""
    a = cfg.attack
    if not a.active or a.kind != "junk_data":
        return data
    names = [c.name for c in cfg.federation.clients]
    vocab = len(data.tokenizer)
    for name in a.clients:
        honest = data.client_tokens[name]
        data.client_tokens[name] = attacks.junk_tokens(len(honest), vocab, [attack_seed(cfg), 7177, names.index(name)], honest.dtype)
        log.warning("attack: %s trains on %d random token ids (junk_data)", name, len(honest))
    return data


class AttackTransport(Transport):
    """The simulated transport, with the attackers' payloads replaced as they are received."""

    def __init__(self, inner: Transport, attack: AttackConfig, spec: dict[str, TensorSpec], seed: int):
        self.inner = inner
        self.attack = attack
        self.spec = spec
        self.attackers = set(attack.clients)
        self.factor = attack.resolved_factor()
        self.generator = torch.Generator().manual_seed(seed)
        self.latest_honest: dict[str, Params] = {}
        self._seen: dict[int, ClientResult] = {}  # results examined and still queued, by id
        self.poisoned = 0

    # the Transport interface, delegated
    def client_names(self) -> list[str]:
        return self.inner.client_names()

    def send(self, client: str, task: TrainTask) -> None:
        self.inner.send(client, task)

    def reachable(self, client: str, round: int) -> bool:
        return self.inner.reachable(client, round)

    def release(self, result: ClientResult, rejection: str | None = None) -> None:
        self.inner.release(result, rejection)

    def checkpoint_parts(self) -> dict[str, Any]:
        return self.inner.checkpoint_parts()

    def now(self) -> float:
        return self.inner.now()

    def close(self) -> None:
        self.inner.close()

    def __getattr__(self, name: str) -> Any:  # elapse, settle, network, in_flight, ...
        return getattr(self.inner, name)

    def receive(self, timeout: float | None = None) -> ClientResult | None:
        self._poison_pending()
        return self.inner.receive(timeout)

    # the attack
    def _pending(self) -> list[ClientResult]:
        settle = getattr(self.inner, "settle", None)
        if settle is not None:
            settle()
        queued = [entry[-1] for entry in sorted(getattr(self.inner, "_queue", []), key=lambda e: e[:2])]
        fresh = [r for r in queued if id(r) not in self._seen]
        self._seen = {id(r): r for r in queued}  # holding them keeps their ids unique
        return fresh

    def _decode(self, result: ClientResult) -> Params | None:
        if result.payload is None or result.error is not None:
            return None
        try:
            return decode_payload(result.payload, self.spec, what=f"update from {result.client}")[0]
        except SkyfedError:
            return None

    def _poison_pending(self) -> None:
        fresh = self._pending()
        # a result restored from a checkpoint may have been poisoned before the stop
        bad = [r for r in fresh if r.client in self.attackers and "attack" not in r.meta]
        for r in fresh:
            if r.client not in self.attackers:
                delta = self._decode(r)
                if delta is not None:
                    self.latest_honest[r.client] = {n: t.clone() for n, t in delta.items()}
        for r in bad:
            self._poison(r)

    def malicious_delta(self, honest_delta: Params) -> Params | None:
        kind, k = self.attack.kind, self.factor
        if kind == "sign_flip":
            return attacks.sign_flip(honest_delta, k)
        if kind == "scale":
            return attacks.scale(honest_delta, k)
        if kind == "noise":
            return attacks.noise(honest_delta, k, self.generator)
        if kind == "alie":
            honest = list(self.latest_honest.values())
            if not honest:
                return None
            n = len(self.inner.client_names())
            z = k if k is not None else attacks.alie_z(n, len(self.attackers))
            return attacks.alie(honest, z)
        return None  # junk_data acts on the data, not here

    def _poison(self, result: ClientResult) -> None:
        delta = self._decode(result)
        if delta is None:
            return
        bad = self.malicious_delta(delta)
        if bad is None:
            log.warning("attack: no honest update known yet; %s sends its honest update", result.client)
            return
        header, _ = read_header(result.payload)
        chain = Chain.from_specs(header.get("codecs", []))
        rest = {key: v for key, v in header.items() if key not in _FRAMING}
        result.payload = pack_parts(chain.encode(bad), chain, **rest)
        result.meta["attack"] = self.attack.kind
        self.poisoned += 1
        log.info("attack: %s sends a %s update (task %d)", result.client, self.attack.kind, result.round)


def wrap_with_attack(cfg: ExperimentConfig, transport: Transport, tokenizer: Any) -> Transport:
    """`transport` itself without an update-level attack; else wrapped in AttackTransport."""
    a = cfg.attack
    if not a.active or a.kind == "junk_data":
        return transport
    from skyfed.model import federated_parameter_names, get_params
    from skyfed.runtime.setup import new_model

    model = new_model(cfg, tokenizer)
    spec = {n: TensorSpec(tuple(t.shape), torch.float32) for n, t in get_params(model, federated_parameter_names(model)).items()}
    log.warning("attack: %s send %s updates (factor %s) -- simulation only", a.clients, a.kind, a.resolved_factor())
    return AttackTransport(transport, a, spec, attack_seed(cfg))
