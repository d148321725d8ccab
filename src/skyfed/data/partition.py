"""Split one corpus' documents across clients.

Each partitioner returns, per client, the sorted indices of its documents; together
they cover every document exactly once and every client gets at least one.

- `iid`: shuffled documents dealt round-robin.
- `natural`: contiguous ranges with about equal token counts.
- `dirichlet`: label skew (Hsu et al. 2019, arXiv:1909.06335): client i's topic mix is
  q_i ~ Dirichlet(alpha); a document of topic k goes to client i with probability
  proportional to q_i[k]. Small alpha: each client sees few topics; large alpha: IID.
- `quantity`: quantity skew, shuffled documents cut at token shares (explicit, or a
  power law share_i ~ (i + 1) ** -power).
- `capacity`: quantity skew with shares proportional to each client's compute
  (the caller passes them as `shares`), so fast clouds get more data.
"""

from __future__ import annotations

import numpy as np

from skyfed.errors import DataError

METHODS = ("iid", "natural", "dirichlet", "quantity", "capacity")


def partition_iid(num_docs: int, num_clients: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Documents shuffled and dealt round-robin: every client sees the same distribution."""
    order = rng.permutation(num_docs)
    return [np.sort(order[i::num_clients]) for i in range(num_clients)]


def partition_natural(doc_lengths: np.ndarray, num_clients: int) -> list[np.ndarray]:
    """Contiguous ranges of documents with about equal token counts, as data that lives
    in different places is. (Contiguous thirds of WikiText-2 still behave as IID.)"""
    cum = np.cumsum(doc_lengths)
    bounds = np.searchsorted(cum, cum[-1] * np.arange(1, num_clients) / num_clients)
    edges = _strictly_increasing([0, *bounds.tolist(), len(doc_lengths)])
    return [np.arange(edges[i], edges[i + 1]) for i in range(num_clients)]


def _strictly_increasing(edges: list[int]) -> list[int]:
    """Nudge inner cut points so that every range holds at least one document."""
    n, last = len(edges) - 1, edges[-1]
    out = list(edges)
    for i in range(1, n):
        out[i] = min(max(out[i], out[i - 1] + 1), last - (n - i))
    return out


def power_shares(num_clients: int, power: float) -> list[float]:
    return [(i + 1) ** -power for i in range(num_clients)]


def partition_quantity(doc_lengths: np.ndarray, shares: list[float], rng: np.random.Generator) -> list[np.ndarray]:
    """Shuffled documents cut so that client i holds about shares[i] / sum(shares) of the tokens."""
    order = rng.permutation(len(doc_lengths))
    cum = np.cumsum(doc_lengths[order])
    fractions = np.cumsum(shares)[:-1] / float(np.sum(shares))
    bounds = np.searchsorted(cum, cum[-1] * fractions)
    edges = _strictly_increasing([0, *bounds.tolist(), len(doc_lengths)])
    return [np.sort(order[edges[i] : edges[i + 1]]) for i in range(len(shares))]


def partition_dirichlet(
    topics: np.ndarray, num_clients: int, alpha: float, rng: np.random.Generator
) -> list[np.ndarray]:
    """Each client's topic mix ~ Dirichlet(alpha); documents follow their topic's client weights."""
    topics = np.asarray(topics)
    num_topics = int(topics.max()) + 1
    mix = rng.dirichlet(np.full(num_topics, alpha), size=num_clients)  # clients x topics
    owner = np.empty(len(topics), dtype=np.int64)
    for k in range(num_topics):
        docs = np.flatnonzero(topics == k)
        weight = np.nan_to_num(mix[:, k])
        p = weight / weight.sum() if weight.sum() > 0 else np.full(num_clients, 1.0 / num_clients)
        owner[docs] = rng.choice(num_clients, size=len(docs), p=p)
    counts = np.bincount(owner, minlength=num_clients)
    for i in np.flatnonzero(counts == 0):  # an empty client takes a document from the largest one
        donor = int(counts.argmax())
        doc = rng.choice(np.flatnonzero(owner == donor))
        owner[doc] = i
        counts[donor] -= 1
        counts[i] += 1
    return [np.flatnonzero(owner == i) for i in range(num_clients)]


def partition_documents(
    method: str,
    doc_lengths: np.ndarray,
    num_clients: int,
    seed: int,
    *,
    topics: np.ndarray | None = None,
    alpha: float = 0.5,
    shares: list[float] | None = None,
    power: float = 1.0,
) -> list[np.ndarray]:
    """Document indices per client. `dirichlet` needs `topics` (a label per document);
    `capacity` needs `shares`; `quantity` uses `shares` if given, else a power law."""
    doc_lengths = np.asarray(doc_lengths)
    if len(doc_lengths) < num_clients:
        raise DataError(f"{len(doc_lengths)} documents cannot be split across {num_clients} clients")
    if shares is not None and len(shares) != num_clients:
        raise DataError(f"data.partition.shares: {len(shares)} shares given for {num_clients} clients")
    rng = np.random.default_rng(seed)
    if method == "iid":
        return partition_iid(len(doc_lengths), num_clients, rng)
    if method == "natural":
        return partition_natural(doc_lengths, num_clients)
    if method == "dirichlet":
        if topics is None or len(topics) != len(doc_lengths):
            raise ValueError("the dirichlet partitioner needs a topic label per document")
        return partition_dirichlet(topics, num_clients, alpha, rng)
    if method == "quantity":
        return partition_quantity(doc_lengths, shares or power_shares(num_clients, power), rng)
    if method == "capacity":
        if shares is None:
            raise ValueError("the capacity partitioner needs each client's compute share")
        return partition_quantity(doc_lengths, shares, rng)
    raise ValueError(f"unknown partition method {method!r}; available: {', '.join(METHODS)}")
