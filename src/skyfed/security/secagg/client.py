"""The client side of secure aggregation, as a state machine over plain messages.

Bonawitz et al. 2017, "Practical Secure Aggregation for Privacy-Preserving Machine
Learning", CCS (semi-honest variant), with SecAgg+'s share groups (Bell et al. 2020).
Stages, each one call whose input and output are JSON-safe dicts (bytes as base64)
except the masked vector, which is raw bytes:

1. `advertise()`          -> two X25519 public keys (pairwise masks, share encryption)
2. `share_keys(roster)`   -> Shamir shares of the mask private key and of a fresh
                             self-mask seed b, each encrypted (AES-GCM) to its holder
3. `mask(bundle, ring)`   -> y = x + PRG(b) + sum_v sign(u, v) PRG(s_uv)  mod 2^bits,
                             sign + for u < v, - for u > v (names compared as strings)
4. `unmask(request)`      -> for each dropped peer, its mask-key share; for each
                             surviving peer (and itself), its self-seed share

Safety rule: a client never reveals both shares of the same peer (with both, the
server could strip every mask from that peer's vector). `unmask` refuses any request
that would, and remembers what it revealed so that a later request cannot either.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import numpy as np

from skyfed.errors import SecAggError
from skyfed.security.secagg import crypto, shamir
from skyfed.security.secagg.session import Roster, SecAggParams, check_threshold, default_threshold

log = logging.getLogger(__name__)

MASK_KEY = "mask_key"
SELF_SEED = "self_seed"


def mask_sign(me: str, peer: str) -> int:
    return 1 if me < peer else -1


def share_aad(session: bytes, owner: str, holder: str) -> bytes:
    return json.dumps(["skyfed/secagg/share", crypto.b64e(session), owner, holder]).encode()


class SecAggClient:
    def __init__(self, name: str, params: SecAggParams):
        self.name = name
        self.params = params
        self._mask_key = crypto.new_private_key()
        self._enc_key = crypto.new_private_key()
        self.stage = "new"
        self.roster: Roster | None = None
        self._group: frozenset[str] = frozenset()
        self._seed: bytes | None = None
        self._held: dict[str, tuple[bytes, bytes]] = {}  # owner -> (mask-key share, self-seed share)
        self._sharers: frozenset[str] = frozenset()
        self._revealed: dict[str, str] = {}  # peer -> MASK_KEY or SELF_SEED

    def _expect(self, stage: str, action: str) -> None:
        if self.stage != stage:
            raise SecAggError(f"secure aggregation: client {self.name!r} cannot {action} at stage {self.stage!r}")

    # ------------------------------------------------------------ 1. advertise keys

    def advertise(self) -> dict[str, Any]:
        self._expect("new", "advertise its keys")
        self.stage = "advertised"
        return {"client": self.name, "mask_pk": crypto.b64e(crypto.public_bytes(self._mask_key)),
                "enc_pk": crypto.b64e(crypto.public_bytes(self._enc_key))}

    # ------------------------------------------------------------ 2. share keys

    def share_keys(self, roster_msg: dict[str, Any]) -> dict[str, Any]:
        self._expect("advertised", "share its keys")
        roster = Roster.from_message(roster_msg)
        p, mine = roster.params, self.params
        if (p.ring_bits, p.dim, p.neighbours, p.layout) != (mine.ring_bits, mine.dim, mine.neighbours, mine.layout):
            raise SecAggError(
                f"secure aggregation: the server's session (ring {p.ring_bits} bits, {p.dim} values, neighbours "
                f"{p.neighbours}) does not match client {self.name!r}'s (ring {mine.ring_bits} bits, {mine.dim} values, "
                f"neighbours {mine.neighbours}) or the tensor layouts differ"
            )
        own = (crypto.public_bytes(self._mask_key), crypto.public_bytes(self._enc_key))
        if roster.keys.get(self.name) != own:
            raise SecAggError(f"secure aggregation: the roster does not carry client {self.name!r}'s own public keys")
        groups = roster.groups()
        expected = mine.threshold or default_threshold(min(len(g) for g in groups.values()))
        if roster.threshold != expected:  # a server may not weaken the threshold
            raise SecAggError(f"secure aggregation: the server asks for threshold {roster.threshold}, expected {expected}")
        check_threshold(roster.threshold, groups)
        self.roster, self._group = roster, groups[self.name]
        self._seed = crypto.random_seed()
        members = sorted(self._group)
        xs = [roster.x(m) for m in members]
        key_shares = shamir.split(crypto.private_bytes(self._mask_key), xs, roster.threshold)
        seed_shares = shamir.split(self._seed, xs, roster.threshold)
        out: dict[str, str] = {}
        for holder in members:
            pair = (key_shares[roster.x(holder)], seed_shares[roster.x(holder)])
            if holder == self.name:
                self._held[self.name] = pair
                continue
            plain = json.dumps({"owner": self.name, "holder": holder, "x": roster.x(holder),
                                MASK_KEY: crypto.b64e(pair[0]), SELF_SEED: crypto.b64e(pair[1])}).encode()
            key = crypto.agree(self._enc_key, roster.keys[holder][1], "share", roster.session, self.name, holder)
            out[holder] = crypto.b64e(crypto.seal(key, plain, share_aad(roster.session, self.name, holder)))
        self.stage = "shared"
        return {"client": self.name, "shares": out, "seed_digest": crypto.b64e(crypto.digest(self._seed))}

    # ------------------------------------------------------------ 3. masked input

    def _open_shares(self, bundle: dict[str, Any]) -> None:
        roster = self.roster
        assert roster is not None
        if crypto.b64d(bundle.get("session"), "session id") != roster.session:
            raise SecAggError(f"secure aggregation: client {self.name!r} got shares of another session")
        sharers = bundle.get("sharers")
        if not isinstance(sharers, list) or not set(sharers) <= set(roster.names) or self.name not in sharers:
            raise SecAggError(f"secure aggregation: client {self.name!r} got a malformed list of sharers")
        self._sharers = frozenset(sharers)
        peers = (self._group & self._sharers) - {self.name}
        sealed = bundle.get("shares")
        if not isinstance(sealed, dict) or set(sealed) != peers:
            got = sorted(sealed) if isinstance(sealed, dict) else sealed
            raise SecAggError(f"secure aggregation: client {self.name!r} expected shares from {sorted(peers)}, got {got}")
        for owner in sorted(peers):
            key = crypto.agree(self._enc_key, roster.keys[owner][1], "share", roster.session, owner, self.name)
            what = f"the share from {owner!r} to {self.name!r}"
            plain = crypto.open_sealed(key, crypto.b64d(sealed[owner], what), share_aad(roster.session, owner, self.name), what)
            try:
                body = json.loads(plain)
                ok = body["owner"] == owner and body["holder"] == self.name and body["x"] == roster.x(self.name)
                pair = (crypto.b64d(body[MASK_KEY], what), crypto.b64d(body[SELF_SEED], what))
            except (ValueError, KeyError, TypeError):
                ok = False
            if not ok:
                raise SecAggError(f"secure aggregation: {what} is not addressed as it claims")
            self._held[owner] = pair

    def mask(self, bundle: dict[str, Any], ring: np.ndarray) -> bytes:
        """The masked vector (little-endian ring elements) for the fixed-point vector `ring`."""
        self._expect("shared", "mask its input")
        roster, params = self.roster, self.params
        assert roster is not None and self._seed is not None
        dtype = crypto.RING_DTYPES[params.ring_bits]
        if ring.dtype != dtype or ring.shape != (params.dim,):
            raise SecAggError(f"secure aggregation: input must be {params.dim} values of {dtype}, got {ring.shape} {ring.dtype}")
        self._open_shares(bundle)
        alive = self._group & self._sharers
        if len(alive) < roster.threshold:
            raise SecAggError(
                f"secure aggregation: only {len(alive)} of client {self.name!r}'s share group finished set-up, "
                f"threshold {roster.threshold}"
            )
        y = ring + crypto.keystream(self._seed, params.dim, params.ring_bits)
        for peer in sorted(alive - {self.name}):
            seed = crypto.agree(self._mask_key, roster.keys[peer][0], "mask", roster.session, self.name, peer)
            stream = crypto.keystream(seed, params.dim, params.ring_bits)
            if mask_sign(self.name, peer) > 0:
                y += stream
            else:
                y -= stream
        self.stage = "masked"
        return y.astype(dtype, copy=False).tobytes()

    # ------------------------------------------------------------ 4. unmasking

    def unmask(self, request: dict[str, Any]) -> dict[str, Any]:
        """Shares the server needs to remove the masks, after checking the request."""
        if self.stage not in ("masked", "done"):  # "done": a repeated request is checked against the record
            raise SecAggError(f"secure aggregation: client {self.name!r} cannot reveal shares at stage {self.stage!r}")
        roster = self.roster
        assert roster is not None
        if crypto.b64d(request.get("session"), "session id") != roster.session:
            raise SecAggError(f"secure aggregation: client {self.name!r} got an unmask request of another session")
        survivors, dropped = request.get("survivors"), request.get("dropped")
        if not isinstance(survivors, list) or not isinstance(dropped, list):
            raise SecAggError("secure aggregation: malformed unmask request")
        alive, gone = set(survivors), set(dropped)
        both = sorted(alive & gone)
        if both:
            raise SecAggError(
                f"secure aggregation: client {self.name!r} refuses to reveal both shares of {both} (safety rule)"
            )
        if self.name not in alive:
            raise SecAggError(f"secure aggregation: client {self.name!r} is not listed as a survivor; it reveals nothing")
        if alive | gone != set(self._sharers):
            raise SecAggError(
                f"secure aggregation: the unmask request must account for exactly the {len(self._sharers)} clients "
                f"that finished set-up"
            )
        if len(alive & self._group) < roster.threshold:
            raise SecAggError(
                f"secure aggregation: only {len(alive & self._group)} survivors in client {self.name!r}'s share group, "
                f"threshold {roster.threshold}: refusing to unmask"
            )
        wanted = {peer: MASK_KEY for peer in gone & self._group} | {peer: SELF_SEED for peer in alive & self._group}
        clash = sorted(p for p, kind in wanted.items() if self._revealed.get(p, kind) != kind)
        if clash:
            raise SecAggError(
                f"secure aggregation: client {self.name!r} already revealed the other share of {clash} (safety rule)"
            )
        self._revealed.update(wanted)
        answer = {
            "client": self.name,
            MASK_KEY: {p: crypto.b64e(self._held[p][0]) for p in sorted(wanted) if wanted[p] == MASK_KEY},
            SELF_SEED: {p: crypto.b64e(self._held[p][1]) for p in sorted(wanted) if wanted[p] == SELF_SEED},
        }
        self.stage = "done"
        return answer
