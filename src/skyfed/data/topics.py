"""Topic labels for documents: k-means of their normalized unigram histograms.

The Dirichlet partitioner needs a label per document to skew clients' label mixes (as
Hsu et al. 2019, "Measuring the Effects of Non-Identical Data Distribution for
Federated Visual Classification", do with class labels). Text has no labels, so each
document gets the k-means cluster of its unigram histogram over the most frequent
tokens, L1-normalized, weighted by inverse document frequency and L2-normalized
(so that cluster centres follow topical words, not "the" and ","). Plain numpy,
seeded k-means++ initialisation (Arthur & Vassilvitskii 2007) and Lloyd iterations.
"""

from __future__ import annotations

import numpy as np


def doc_features(tokens: np.ndarray, offsets: np.ndarray, max_features: int = 1024) -> np.ndarray:
    """(num_docs, F) float32 idf-weighted, L2-normalized unigram histograms of the F most frequent ids."""
    tokens = np.asarray(tokens)
    num_docs = len(offsets) - 1
    counts = np.bincount(tokens)
    if num_docs > 20_000:
        max_features = min(max_features, 256)  # keeps the matrix small for many-document corpora
    feats = np.argsort(-counts, kind="stable")[: min(max_features, int((counts > 0).sum()))]
    column = np.full(len(counts), -1, dtype=np.int64)
    column[feats] = np.arange(len(feats))
    doc_of = np.repeat(np.arange(num_docs), np.diff(offsets))
    col = column[tokens]
    keep = col >= 0
    hist = np.bincount(doc_of[keep] * len(feats) + col[keep], minlength=num_docs * len(feats))
    hist = hist.reshape(num_docs, len(feats)).astype(np.float64)
    hist /= np.maximum(hist.sum(1, keepdims=True), 1.0)
    df = (hist > 0).sum(0)
    hist *= np.log((1.0 + num_docs) / (1.0 + df)) + 1.0
    hist /= np.maximum(np.linalg.norm(hist, axis=1, keepdims=True), 1e-12)
    return hist.astype(np.float32)


def kmeans(x: np.ndarray, k: int, rng: np.random.Generator, iters: int = 50) -> np.ndarray:
    """Cluster labels (0..k-1) of the rows of `x` by k-means++ then Lloyd iterations."""
    n = len(x)
    k = max(1, min(k, n))
    x = x.astype(np.float64)
    sq = (x * x).sum(1)
    centres = [x[rng.integers(n)]]
    dist = ((x - centres[0]) ** 2).sum(1)
    for _ in range(1, k):
        total = dist.sum()
        i = rng.choice(n, p=dist / total) if total > 0 else rng.integers(n)
        centres.append(x[i])
        dist = np.minimum(dist, ((x - x[i]) ** 2).sum(1))
    c = np.stack(centres)
    labels = np.full(n, -1)
    for _ in range(iters):
        d = sq[:, None] - 2 * x @ c.T + (c * c).sum(1)[None, :]
        new = d.argmin(1)
        if np.array_equal(new, labels):
            break
        labels = new
        for j in range(k):
            members = labels == j
            if members.any():
                c[j] = x[members].mean(0)
            else:  # an empty cluster restarts at the point farthest from its centre
                far = int(d[np.arange(n), labels].argmax())
                c[j] = x[far]
    return labels


def document_topics(tokens: np.ndarray, offsets: np.ndarray, num_topics: int, seed: int) -> np.ndarray:
    """A topic label per document, deterministic for a seed."""
    return kmeans(doc_features(tokens, offsets), num_topics, np.random.default_rng([seed, 11]))


def select_topics(train, valid, keep: list[int], num_topics: int, seed: int):
    """(train, valid) TokenShards holding only the documents whose topic is in `keep`.

    Both splits are labelled together (one k-means over their documents), so the same
    corpus, tokenizer, `num_topics` and `seed` give the same topics in every run: a model
    pretrained on some topics can be fine-tuned and evaluated on the others."""
    from skyfed.errors import ConfigError, DataError

    bad = [k for k in keep if not 0 <= k < num_topics]
    if bad or not keep:
        raise ConfigError(f"data.topics: topics are 0..{num_topics - 1} (data.partition.num_topics), got {keep}")
    tokens = np.concatenate([np.asarray(train.tokens), np.asarray(valid.tokens)])
    offsets = np.concatenate([train.offsets, train.offsets[-1] + valid.offsets[1:]])
    labels = document_topics(tokens, offsets, num_topics, seed)
    chosen = np.isin(labels, keep)
    train_idx = np.flatnonzero(chosen[: train.num_docs])
    valid_idx = np.flatnonzero(chosen[train.num_docs :])
    if len(train_idx) == 0 or len(valid_idx) == 0:
        split = "training" if len(train_idx) == 0 else "validation"
        raise DataError(f"data.topics: no {split} document has topic {keep} (of {num_topics})")
    return train.subset(train_idx), valid.subset(valid_idx)
