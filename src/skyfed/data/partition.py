"""Split one corpus' documents across clients.

Each partitioner returns, per client, the indices of its documents; together they
cover every document exactly once.
"""

from __future__ import annotations

import numpy as np


def partition_iid(num_docs: int, num_clients: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Documents shuffled and dealt round-robin: every client sees the same distribution."""
    order = rng.permutation(num_docs)
    return [np.sort(order[i::num_clients]) for i in range(num_clients)]


def partition_natural(doc_lengths: np.ndarray, num_clients: int) -> list[np.ndarray]:
    """Contiguous ranges of documents with about equal token counts, as data that lives
    in different places is. (Contiguous thirds of WikiText-2 still behave as IID.)"""
    cum = np.cumsum(doc_lengths)
    bounds = np.searchsorted(cum, cum[-1] * np.arange(1, num_clients) / num_clients)
    edges = [0, *bounds.tolist(), len(doc_lengths)]
    return [np.arange(edges[i], edges[i + 1]) for i in range(num_clients)]


def partition_documents(
    method: str, doc_lengths: np.ndarray, num_clients: int, seed: int
) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    if method == "iid":
        return partition_iid(len(doc_lengths), num_clients, rng)
    if method == "natural":
        return partition_natural(doc_lengths, num_clients)
    raise ValueError(f"unknown partition method {method!r}")
