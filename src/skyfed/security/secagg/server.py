"""The server side of secure aggregation: relays keys and shares, folds masked vectors
into one running sum in the ring, and removes the masks with the survivors' shares.

Bonawitz et al. 2017 (semi-honest variant) with SecAgg+ share groups (Bell et al.
2020). The server holds one ring vector at a time, never n. Stages:

1. `receive_keys(name, msg)` for each client, then `roster()` (to every client)
2. `receive_shares(name, msg)`, then `close_sharing()` and `bundle_for(name)`
3. `add_masked(name, payload, weight)` folds each masked vector as it arrives
4. `unmask_request()` (refused with `SecAggError` when too few survived), then
   `receive_unmask(name, msg)` and `finish()` -> the exact ring sum of the survivors

`name` is the identity the transport authenticated; a message claiming another name is
refused. Any failure raises `SecAggError`, and the caller must then leave the global
model unchanged.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from skyfed.errors import SecAggError
from skyfed.security.secagg import crypto, shamir
from skyfed.security.secagg.client import MASK_KEY, SELF_SEED, mask_sign
from skyfed.security.secagg.session import Roster, SecAggParams, check_threshold, default_threshold
from skyfed.security.secagg.graph import share_groups

log = logging.getLogger(__name__)


@dataclass
class SecAggResult:
    """The unmasked ring sum of the survivors' inputs and who they are."""

    ring_sum: np.ndarray
    survivors: list[str]
    dropped: list[str]
    total_weight: float


class SecAggServer:
    def __init__(self, params: SecAggParams, round: int = 0, session: bytes | None = None, graph_seed: int | None = None):
        self.params = params
        self.round = round
        self.session = session if session is not None else os.urandom(16)
        self.graph_seed = graph_seed if graph_seed is not None else int.from_bytes(os.urandom(8), "big") >> 1  # 63 bits: JSON headers carry signed 64-bit integers
        self.stage = "keys"
        self._keys: dict[str, tuple[bytes, bytes]] = {}
        self._roster: Roster | None = None
        self._groups: dict[str, frozenset[str]] = {}
        self._sealed: dict[str, dict[str, str]] = {}  # owner -> holder -> ciphertext
        self._digests: dict[str, bytes] = {}
        self._sharers: list[str] = []
        self._sum = np.zeros(params.dim, dtype=crypto.RING_DTYPES[params.ring_bits])
        self._weights: dict[str, float] = {}
        self._request: dict[str, Any] | None = None
        self._revealed: dict[str, dict[str, dict[str, bytes]]] = {MASK_KEY: {}, SELF_SEED: {}}  # kind -> owner -> holder -> share
        self._answered: set[str] = set()

    def _expect(self, stage: str, action: str) -> None:
        if self.stage != stage:
            raise SecAggError(f"secure aggregation: the server cannot {action} at stage {self.stage!r}")

    @staticmethod
    def _claimed(name: str, msg: dict[str, Any]) -> None:
        if not isinstance(msg, dict) or msg.get("client") != name:
            raise SecAggError(f"secure aggregation: a message from {name!r} claims to be from {msg.get('client')!r}"
                              if isinstance(msg, dict) else f"secure aggregation: malformed message from {name!r}")

    # ------------------------------------------------------------ 1. keys

    def receive_keys(self, name: str, msg: dict[str, Any]) -> None:
        self._expect("keys", "accept public keys")
        self._claimed(name, msg)
        if name in self._keys:
            raise SecAggError(f"secure aggregation: client {name!r} advertised its keys twice")
        mask_pk, enc_pk = crypto.b64d(msg.get("mask_pk"), "mask key"), crypto.b64d(msg.get("enc_pk"), "encryption key")
        crypto.load_public(mask_pk), crypto.load_public(enc_pk)
        if mask_pk == enc_pk:
            raise SecAggError(f"secure aggregation: client {name!r} advertised the same key twice")
        self._keys[name] = (mask_pk, enc_pk)

    def roster(self) -> dict[str, Any]:
        """Close key collection; the roster every client receives."""
        if self._roster is None:
            self._expect("keys", "publish the roster")
            if len(self._keys) < 2:
                raise SecAggError(f"secure aggregation needs at least 2 clients, {len(self._keys)} advertised keys")
            groups = share_groups(sorted(self._keys), self.params.neighbours, self.graph_seed)
            threshold = self.params.threshold or default_threshold(min(len(g) for g in groups.values()))
            check_threshold(threshold, groups)
            self._roster = Roster(self.session, self.round, self.params, threshold, self.graph_seed, dict(self._keys))
            self._groups = groups
            self.stage = "shares"
        return self._roster.to_message()

    @property
    def threshold(self) -> int:
        if self._roster is None:
            raise SecAggError("secure aggregation: no roster yet")
        return self._roster.threshold

    # ------------------------------------------------------------ 2. shares

    def receive_shares(self, name: str, msg: dict[str, Any]) -> None:
        self._expect("shares", "accept shares")
        self._claimed(name, msg)
        if name not in self._groups:
            raise SecAggError(f"secure aggregation: client {name!r} is not in this session's roster")
        if name in self._sealed:
            raise SecAggError(f"secure aggregation: client {name!r} sent its shares twice")
        sealed = msg.get("shares")
        expected = self._groups[name] - {name}
        if not isinstance(sealed, dict) or set(sealed) != expected or not all(isinstance(v, str) for v in sealed.values()):
            raise SecAggError(f"secure aggregation: client {name!r} must send one encrypted share to each of {sorted(expected)}")
        digest = crypto.b64d(msg.get("seed_digest"), "seed digest")
        self._sealed[name] = dict(sealed)
        self._digests[name] = digest

    def close_sharing(self) -> list[str]:
        """End set-up: the clients that sent their shares (the only ones whose input counts)."""
        self._expect("shares", "close set-up")
        sharers = sorted(self._sealed)
        assert self._roster is not None
        if len(sharers) < self._roster.threshold:
            raise SecAggError(
                f"secure aggregation: only {len(sharers)} clients finished set-up, threshold {self._roster.threshold}"
            )
        self._sharers = sharers
        self.stage = "masked"
        return list(sharers)

    def bundle_for(self, holder: str) -> dict[str, Any]:
        """The encrypted shares addressed to `holder` and the list of clients that shared."""
        self._expect("masked", "hand out shares")
        if holder not in self._sharers:
            raise SecAggError(f"secure aggregation: client {holder!r} did not finish set-up")
        shares = {owner: sealed[holder] for owner, sealed in self._sealed.items() if holder in sealed and owner in self._sharers}
        return {"session": crypto.b64e(self.session), "sharers": list(self._sharers), "shares": shares}

    # ------------------------------------------------------------ 3. masked input

    def add_masked(self, name: str, payload: bytes | memoryview, weight: float = 1.0) -> None:
        """Fold one masked vector into the running sum (mod 2^bits)."""
        self._expect("masked", "accept a masked vector")
        if name not in self._sharers:
            raise SecAggError(f"secure aggregation: client {name!r} did not finish set-up; its vector cannot be unmasked")
        if name in self._weights:
            raise SecAggError(f"secure aggregation: client {name!r} sent a second masked vector")
        if len(payload) != self.params.vector_bytes:
            raise SecAggError(
                f"secure aggregation: masked vector of {len(payload)} bytes from {name!r}, expected {self.params.vector_bytes}"
            )
        if not (isinstance(weight, (int, float)) and 0 < weight <= 1):
            raise SecAggError(f"secure aggregation: client {name!r}'s weight must be in (0, 1], got {weight!r}")
        self._sum += np.frombuffer(payload, dtype=self._sum.dtype)
        self._weights[name] = float(weight)

    # ------------------------------------------------------------ 4. unmasking

    def _survivors_short(self, survivors: set[str]) -> list[str]:
        """Clients whose secret cannot be rebuilt: fewer than t survivors hold its shares."""
        t = self.threshold
        need = [u for u in survivors] + [v for v in self._sharers if v not in survivors and self._groups[v] & survivors]
        return sorted(c for c in need if len(self._groups[c] & survivors) < t)

    def unmask_request(self) -> dict[str, Any]:
        """Close the masked-input stage; what every survivor is asked. Refused (nothing is
        asked of anyone) when the survivors cannot rebuild the secrets the sum needs."""
        if self.stage == "unmask" and self._request is not None:
            return self._request
        self._expect("masked", "ask for unmasking")
        survivors = set(self._weights)
        short = self._survivors_short(survivors)
        if len(survivors) < self.threshold or short:
            self.stage = "failed"
            raise SecAggError(
                f"secure aggregation: {len(survivors)} of {len(self._sharers)} clients sent masked updates; "
                f"threshold {self.threshold} not met for {short or sorted(survivors)}: the round is refused"
            )
        self._request = {"session": crypto.b64e(self.session), "survivors": sorted(survivors),
                         "dropped": sorted(set(self._sharers) - survivors)}
        self.stage = "unmask"
        return self._request

    def receive_unmask(self, name: str, msg: dict[str, Any]) -> None:
        self._expect("unmask", "accept unmasking shares")
        self._claimed(name, msg)
        assert self._request is not None
        if name not in self._request["survivors"]:
            raise SecAggError(f"secure aggregation: client {name!r} was not asked to unmask")
        if name in self._answered:
            raise SecAggError(f"secure aggregation: client {name!r} answered twice")
        survivors, dropped = set(self._request["survivors"]), set(self._request["dropped"])
        group = self._groups[name]
        wanted = {MASK_KEY: dropped & group, SELF_SEED: survivors & group}
        for kind, owners in wanted.items():
            got = msg.get(kind)
            if not isinstance(got, dict) or set(got) != owners:
                raise SecAggError(f"secure aggregation: client {name!r} must send {kind} shares of {sorted(owners)}")
            for owner, text in got.items():
                self._revealed[kind].setdefault(owner, {})[name] = crypto.b64d(text, f"{kind} share of {owner!r}")
        self._answered.add(name)

    def finish(self) -> SecAggResult:
        """Rebuild the secrets, strip the masks; the exact ring sum of the survivors."""
        self._expect("unmask", "finish")
        assert self._roster is not None and self._request is not None
        roster, t, p = self._roster, self._roster.threshold, self.params
        survivors, dropped = self._request["survivors"], self._request["dropped"]
        short = self.missing_shares()
        if short:  # the caller may wait for more answers, or give up (the round is then refused)
            raise SecAggError(f"secure aggregation: fewer than {t} shares so far to rebuild {short}")
        try:  # rebuild and check every secret before the sum is touched
            seeds = {u: self._rebuild(SELF_SEED, u) for u in survivors}
            for u, seed in seeds.items():
                if crypto.digest(seed) != self._digests[u]:
                    raise SecAggError(f"secure aggregation: the self-mask seed rebuilt for {u!r} does not match its commitment")
            keys = {v: self._rebuild(MASK_KEY, v) for v in dropped if self._groups[v] & set(survivors)}
            for v, raw in keys.items():
                if crypto.public_bytes(crypto.load_private(raw)) != roster.keys[v][0]:
                    raise SecAggError(f"secure aggregation: the mask key rebuilt for {v!r} does not match its public key")
        except SecAggError:
            self.stage = "failed"
            raise
        total = self._sum
        for seed in seeds.values():
            total -= crypto.keystream(seed, p.dim, p.ring_bits)
        for v, raw in keys.items():
            key = crypto.load_private(raw)
            for u in sorted(self._groups[v] & set(survivors)):
                stream = crypto.keystream(crypto.agree(key, roster.keys[u][0], "mask", roster.session, u, v), p.dim, p.ring_bits)
                # survivor u added sign(u, v) * PRG(s_uv); take it out
                if mask_sign(u, v) > 0:
                    total -= stream
                else:
                    total += stream
        self.stage = "done"
        log.info("secure aggregation: round %d unmasked the sum of %d clients (%d dropped, threshold %d)",
                 self.round, len(survivors), len(dropped), t)
        return SecAggResult(total, list(survivors), list(dropped), sum(self._weights[u] for u in survivors))

    def missing_shares(self) -> list[str]:
        """The secrets (kind:owner) that fewer than t answers so far let the server rebuild."""
        assert self._request is not None
        survivors = set(self._request["survivors"])
        needed = [(SELF_SEED, u) for u in self._request["survivors"]]
        needed += [(MASK_KEY, v) for v in self._request["dropped"] if self._groups[v] & survivors]
        return [f"{kind}:{owner}" for kind, owner in needed if len(self._revealed[kind].get(owner, {})) < self.threshold]

    def _rebuild(self, kind: str, owner: str) -> bytes:
        assert self._roster is not None
        shares = {self._roster.x(holder): share for holder, share in self._revealed[kind].get(owner, {}).items()}
        return shamir.combine(shares, self._roster.threshold, f"{kind} of {owner!r}")
