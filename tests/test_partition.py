"""Partitioners: every document exactly once, sizes and shares, topic recovery, and the
Dirichlet heterogeneity dial (alpha large ~ IID, alpha small clearly more divergent)."""

from __future__ import annotations

import numpy as np
import pytest

from skyfed.config import load_config
from skyfed.data.partition import METHODS, partition_documents
from skyfed.data.partition_stats import js_divergence, partition_stats
from skyfed.data.shards import TokenShard
from skyfed.data.topics import document_topics
from skyfed.errors import DataError
from skyfed.runtime.partitioning import capacity_shares

VOCAB = 400


def synthetic_corpus(num_docs: int = 240, num_topics: int = 4, seed: int = 0) -> tuple[TokenShard, np.ndarray]:
    """Documents of 4 topics: each topic favours its own 60-token slice of the vocabulary,
    and all share 160 common tokens. Returns the shard and the true topic of each document."""
    rng = np.random.default_rng(seed)
    truth = rng.integers(num_topics, size=num_docs)
    docs = []
    for t in truth:
        length = int(rng.integers(50, 400))
        topical = 160 + 60 * t + rng.integers(60, size=length)
        common = rng.integers(160, size=length)
        docs.append(np.where(rng.random(length) < 0.5, topical, common).astype(np.uint16))
    offsets = np.zeros(num_docs + 1, dtype=np.int64)
    np.cumsum([len(d) for d in docs], out=offsets[1:])
    return TokenShard(np.concatenate(docs), offsets), truth


@pytest.fixture(scope="module")
def corpus():
    return synthetic_corpus()


def split(shard: TokenShard, method: str, n: int = 3, seed: int = 0, **kw):
    topics = document_topics(shard.tokens, shard.offsets, 4, seed)
    return partition_documents(method, shard.doc_lengths(), n, seed, topics=topics, **kw), topics


@pytest.mark.parametrize("method", METHODS)
def test_every_document_and_token_exactly_once(corpus, method):
    shard, _ = corpus
    kw = {"shares": [1.0, 2.0, 5.0]} if method == "capacity" else {"alpha": 0.1}
    parts, _ = split(shard, method, **kw)
    assert len(parts) == 3 and all(len(p) > 0 for p in parts)
    allidx = np.concatenate(parts)
    assert sorted(allidx.tolist()) == list(range(shard.num_docs))  # each once, none lost
    subs = [shard.subset(p) for p in parts]
    assert sum(s.num_tokens for s in subs) == shard.num_tokens
    pooled = np.sort(np.concatenate([s.tokens for s in subs]))
    assert np.array_equal(pooled, np.sort(shard.tokens))  # the same multiset of tokens


def test_kmeans_topics_recover_the_true_topics(corpus):
    shard, truth = corpus
    labels = document_topics(shard.tokens, shard.offsets, 4, seed=0)
    # purity: each found cluster is (almost) one true topic
    purity = sum(np.bincount(truth[labels == k]).max() for k in np.unique(labels)) / len(truth)
    assert purity > 0.95
    assert np.array_equal(labels, document_topics(shard.tokens, shard.offsets, 4, seed=0))  # seeded


def heterogeneity(shard: TokenShard, parts: list[np.ndarray], topics: np.ndarray) -> float:
    subs = [shard.subset(p).tokens for p in parts]
    return partition_stats(["a", "b", "c"], subs, parts, topics, 4, VOCAB, "x")["heterogeneity_jsd"]


def test_dirichlet_alpha_dials_heterogeneity(corpus):
    shard, _ = corpus
    iid, small, large = [], [], []
    for seed in range(3):
        p, t = split(shard, "iid", seed=seed)
        iid.append(heterogeneity(shard, p, t))
        p, t = split(shard, "dirichlet", seed=seed, alpha=1e4)
        large.append(heterogeneity(shard, p, t))
        p, t = split(shard, "dirichlet", seed=seed, alpha=0.1)
        small.append(heterogeneity(shard, p, t))
    iid_m, large_m, small_m = np.mean(iid), np.mean(large), np.mean(small)
    assert abs(large_m - iid_m) < 0.5 * iid_m  # alpha -> infinity behaves as IID
    assert small_m > 5 * iid_m  # alpha = 0.1 is clearly non-IID


def test_quantity_shares_and_power_law(corpus):
    shard, _ = corpus
    parts = partition_documents("quantity", shard.doc_lengths(), 3, 0, shares=[1, 1, 2])
    tokens = np.array([shard.doc_lengths()[p].sum() for p in parts])
    assert tokens.sum() == shard.num_tokens
    assert np.allclose(tokens / tokens.sum(), [0.25, 0.25, 0.5], atol=0.03)
    parts = partition_documents("quantity", shard.doc_lengths(), 3, 0, power=1.0)  # 1 : 1/2 : 1/3
    tokens = np.array([shard.doc_lengths()[p].sum() for p in parts])
    assert np.allclose(tokens / tokens.sum(), np.array([6, 3, 2]) / 11, atol=0.03)


def test_capacity_shares_follow_cloud_speed():
    cfg = load_config(overrides=[
        "federation.clients=[{name: a, cloud: aws}, {name: b, cloud: onprem}, {name: c, cloud: aws}]",
    ])
    shares = capacity_shares(cfg, ["a", "b", "c"])
    assert shares[1] / shares[0] == pytest.approx(0.25)  # onprem speed 0.25 vs aws 1.0
    assert shares[0] == shares[2]


def test_one_document_per_client_and_too_few_documents():
    lengths = np.array([5, 7, 9])
    for method in ("iid", "natural", "quantity"):
        parts = partition_documents(method, lengths, 3, 0)
        assert sorted(len(p) for p in parts) == [1, 1, 1]
    with pytest.raises(DataError, match="3 documents cannot be split across 4 clients"):
        partition_documents("iid", lengths, 4, 0)


def test_js_divergence_bounds():
    assert js_divergence(np.array([1, 2, 3]), np.array([2, 4, 6])) == pytest.approx(0.0, abs=1e-12)
    assert js_divergence(np.array([1, 0]), np.array([0, 1])) == pytest.approx(1.0)


def test_wrong_number_of_shares_is_one_clear_error():
    with pytest.raises(DataError, match="data.partition.shares: 2 shares given for 3 clients"):
        partition_documents("quantity", np.array([5, 7, 9, 4]), 3, 0, shares=[1, 2])


def test_more_clients_than_documents_splits_documents_into_windows():
    from skyfed.runtime.partitioning import split_documents

    lengths = [5000, 40, 30, 2000, 700]  # 5 documents, two shorter than one window of 130
    tokens = np.arange(sum(lengths), dtype=np.int32)
    shard = TokenShard(tokens, np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64))
    assert split_documents(shard, 5, 130) is shard  # enough documents: unchanged
    pieces = split_documents(shard, 20, 130)
    sizes = pieces.doc_lengths()
    assert pieces.num_docs >= 20 and sizes.min() >= 130 and sizes.sum() == sum(lengths)
    assert pieces.tokens is tokens and pieces.offsets[-1] == len(tokens)
    for method in ("natural", "dirichlet", "iid"):
        topics = np.arange(pieces.num_docs) % 3
        parts = partition_documents(method, sizes, 20, 0, topics=topics)
        assert sorted(np.concatenate(parts).tolist()) == list(range(pieces.num_docs))
        assert min(sizes[p].sum() for p in parts) >= 130  # every client has at least one window
