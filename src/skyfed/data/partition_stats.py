"""How different the clients' data are: sizes, topic histograms and a heterogeneity score.

The score of a client is the Jensen-Shannon divergence (Lin 1991, "Divergence
measures based on the Shannon entropy"), in bits (0 = identical, 1 = disjoint), of its
unigram distribution to the pooled unigram distribution of all clients; the
partition's score is the plain mean over clients (each client's divergence is what its
model sees; the token-weighted mean is reported too). Very small clients read high
even under IID sampling: compare scores of partitions with similar client sizes.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def js_divergence(p: np.ndarray, q: np.ndarray) -> float:
    """JSD(p || q) in bits of two (unnormalized) histograms over the same support."""
    p = np.asarray(p, dtype=np.float64)
    q = np.asarray(q, dtype=np.float64)
    p = p / p.sum()
    q = q / q.sum()
    m = 0.5 * (p + q)

    def kl(a: np.ndarray) -> float:
        nz = a > 0
        return float((a[nz] * np.log2(a[nz] / m[nz])).sum())

    return max(0.0, 0.5 * kl(p) + 0.5 * kl(q))


def partition_stats(
    names: list[str],
    client_tokens: list[np.ndarray],
    client_docs: list[np.ndarray],
    topics: np.ndarray | None,
    num_topics: int,
    vocab_size: int,
    method: str,
) -> dict[str, Any]:
    """Per client: documents, tokens, share, topic histogram and JSD to the pooled unigram distribution."""
    counts = [np.bincount(np.asarray(t), minlength=vocab_size) for t in client_tokens]
    pooled = np.sum(counts, axis=0)
    total = int(sum(len(t) for t in client_tokens))
    clients: dict[str, Any] = {}
    for name, tokens, docs, c in zip(names, client_tokens, client_docs, counts):
        hist = np.bincount(topics[docs], minlength=num_topics).tolist() if topics is not None else None
        clients[name] = {
            "docs": int(len(docs)),
            "tokens": int(len(tokens)),
            "share": len(tokens) / total if total else 0.0,
            "topic_hist": hist,
            "jsd_to_pooled": js_divergence(c, pooled),
        }
    score = float(np.mean([v["jsd_to_pooled"] for v in clients.values()]))
    weighted = sum(v["jsd_to_pooled"] * v["tokens"] for v in clients.values()) / max(1, total)
    return {
        "method": method,
        "num_clients": len(names),
        "total_tokens": total,
        "total_docs": int(sum(len(d) for d in client_docs)),
        "num_topics": num_topics if topics is not None else None,
        "heterogeneity_jsd": score,
        "heterogeneity_jsd_weighted": weighted,
        "clients": clients,
    }
