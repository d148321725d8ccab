"""Who shares with whom: the complete graph (Bonawitz et al. 2017) or, for SecAgg+,
a sparse k-regular graph (Bell et al. 2020, "Secure Single-Server Aggregation with
(Poly)Logarithmic Overhead", CCS, IACR ePrint 2020/704; their Harary-graph construction).

The graph is a Harary graph H(k, n) over a random permutation of the clients: the
client at position p is joined to the k/2 positions on each side of it on a ring. The
permutation comes from a public seed in the roster, so every client recomputes the
same graph and can check which peers it is asked to share with.
"""

from __future__ import annotations

import numpy as np

from skyfed.errors import SecAggError


def share_groups(names: list[str], neighbours: int | None, seed: int) -> dict[str, frozenset[str]]:
    """For each client, itself plus the peers it masks with and shares its secrets among."""
    names = sorted(names)
    n = len(names)
    if neighbours is None or neighbours >= n - 1:
        everyone = frozenset(names)
        return {name: everyone for name in names}
    if neighbours < 2 or neighbours % 2:
        raise SecAggError(f"secure aggregation: neighbours must be an even number >= 2, got {neighbours}")
    order = [names[i] for i in np.random.default_rng(seed).permutation(n)]
    half = neighbours // 2
    groups = {}
    for p, name in enumerate(order):
        groups[name] = frozenset(order[(p + d) % n] for d in range(-half, half + 1))
    return groups
