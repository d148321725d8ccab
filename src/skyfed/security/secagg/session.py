"""What the server and the clients of one secure-aggregation session agree on.

A session is one aggregation (one round, or one FedBuff buffer). Its roster, built by
the server from the clients' advertised public keys and sent to all of them, fixes the
session id (HKDF salt and AEAD associated data), the ring, the vector length, the
threshold and the share groups (complete graph, or SecAgg+'s k-regular graph).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from skyfed.errors import SecAggError
from skyfed.security.secagg.crypto import b64d, b64e
from skyfed.security.secagg.graph import share_groups


@dataclass(frozen=True)
class SecAggParams:
    """Protocol settings both sides are configured with (the roster must repeat them)."""

    ring_bits: int  # 16 or 32
    dim: int  # ring elements per vector
    threshold: int | None = None  # shares needed to recover a secret; None = a majority of a share group
    neighbours: int | None = None  # SecAgg+: peers per client (even); None = everyone (Bonawitz)
    layout: str = ""  # fingerprint of the tensor layout, when there is one

    def __post_init__(self) -> None:
        if self.ring_bits not in (16, 32):
            raise SecAggError(f"secure aggregation: ring bits must be 16 or 32, got {self.ring_bits}")
        if self.dim < 1:
            raise SecAggError(f"secure aggregation: the vector length must be >= 1, got {self.dim}")

    @property
    def vector_bytes(self) -> int:
        return self.dim * self.ring_bits // 8


def default_threshold(group_size: int) -> int:
    """A strict majority of a share group (at least 2: one share never reveals a secret)."""
    return max(2, group_size // 2 + 1)


@dataclass(frozen=True)
class Roster:
    session: bytes
    round: int
    params: SecAggParams
    threshold: int
    graph_seed: int
    keys: dict[str, tuple[bytes, bytes]]  # name -> (mask public key, encryption public key)

    @property
    def names(self) -> list[str]:
        return sorted(self.keys)

    def groups(self) -> dict[str, frozenset[str]]:
        return share_groups(self.names, self.params.neighbours, self.graph_seed)

    def x(self, name: str) -> int:
        """The Shamir x-coordinate of a holder: its 1-based position in the roster."""
        return self.names.index(name) + 1

    def to_message(self) -> dict[str, Any]:
        p = self.params
        return {
            "session": b64e(self.session), "round": self.round, "ring_bits": p.ring_bits, "dim": p.dim,
            "threshold": self.threshold, "neighbours": p.neighbours, "layout": p.layout, "graph_seed": self.graph_seed,
            "clients": {name: {"mask_pk": b64e(m), "enc_pk": b64e(e)} for name, (m, e) in sorted(self.keys.items())},
        }

    @classmethod
    def from_message(cls, msg: dict[str, Any]) -> "Roster":
        try:
            params = SecAggParams(int(msg["ring_bits"]), int(msg["dim"]), int(msg["threshold"]),
                                  None if msg["neighbours"] is None else int(msg["neighbours"]), str(msg["layout"]))
            keys = {str(name): (b64d(k["mask_pk"], f"{name}'s mask key"), b64d(k["enc_pk"], f"{name}'s encryption key"))
                    for name, k in dict(msg["clients"]).items()}
            return cls(b64d(msg["session"], "session id"), int(msg["round"]), params, int(msg["threshold"]),
                       int(msg["graph_seed"]), keys)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise SecAggError(f"secure aggregation: malformed roster: {exc!r}") from None


def check_threshold(threshold: int, groups: dict[str, frozenset[str]]) -> None:
    smallest = min(len(g) for g in groups.values())
    if not 2 <= threshold <= smallest:
        raise SecAggError(
            f"secure aggregation: threshold {threshold} must be between 2 and the share-group size {smallest}"
        )
