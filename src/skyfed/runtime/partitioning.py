"""Split the experiment's shared corpus across its clients as `data.partition` says,
and describe the result (`partition.json` in every run directory).

    skyfed partition CONFIG --out DIR     # the shards and the report, without training
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from skyfed.config import ExperimentConfig
from skyfed.data.partition import partition_documents
from skyfed.data.partition_stats import partition_stats
from skyfed.data.shards import TokenShard
from skyfed.data.topics import document_topics


@dataclass
class Partition:
    names: list[str]
    doc_indices: list[np.ndarray]  # per client, into the train shard
    shards: list[TokenShard]
    stats: dict[str, Any]


def capacity_shares(cfg: ExperimentConfig, names: list[str]) -> list[float]:
    """Each client's training throughput in its cloud's profile (relative compute)."""
    from skyfed.clouds import network_from_config

    net = network_from_config(cfg, num_params=1)
    return [net.throughput(n) for n in names]


def split_documents(train: TokenShard, num_clients: int, min_tokens: int) -> TokenShard:
    """`train` with its documents cut into pieces when it has fewer documents than clients
    (WikiText-2 has 629 articles; 1,000 clients need more): each document becomes pieces
    of about total / (2 * num_clients) tokens, never fewer than `min_tokens` (one training
    window); a piece that would be shorter joins the next one. Pieces of one article stay
    in order, so `natural` still gives each client a contiguous stretch of the corpus and
    `dirichlet` still labels each piece with its topic."""
    if train.num_docs >= num_clients:
        return train
    piece = max(min_tokens, train.num_tokens // (2 * num_clients))
    bounds = [0]
    for start, end in zip(train.offsets[:-1].tolist(), train.offsets[1:].tolist()):
        k = max(1, (end - start) // piece)
        for cut in [*(start + (end - start) * np.arange(1, k) // k).tolist(), end]:
            if cut - bounds[-1] >= min_tokens:
                bounds.append(int(cut))
    if len(bounds) == 1:
        bounds.append(train.num_tokens)
    bounds[-1] = train.num_tokens  # a short tail joins the last piece
    return TokenShard(train.tokens, np.asarray(bounds, dtype=np.int64))


def plan_partition(cfg: ExperimentConfig, train: TokenShard, names: list[str], vocab_size: int) -> Partition:
    """Partition `train` across `names` (the clients without their own data); with more
    clients than documents, across pieces of documents (`split_documents`)."""
    p = cfg.data.partition
    seed = cfg.seed if p.seed is None else p.seed
    docs = train.num_docs
    train = split_documents(train, len(names), cfg.train.seq_len + 2)
    topics = document_topics(train.tokens, train.offsets, p.num_topics, seed)
    shares = capacity_shares(cfg, names) if p.method == "capacity" else p.shares
    parts = partition_documents(
        p.method, train.doc_lengths(), len(names), seed, topics=topics, alpha=p.alpha, shares=shares, power=p.power
    )
    shards = [train.subset(idx) for idx in parts]
    stats = partition_stats(names, [s.tokens for s in shards], parts, topics, p.num_topics, vocab_size, p.method)
    stats.update(seed=seed, alpha=p.alpha if p.method == "dirichlet" else None, shares=shares)
    if train.num_docs != docs:  # the indices in this report are pieces of documents
        stats.update(documents=docs, document_pieces=train.num_docs)
    return Partition(names, parts, shards, stats)


def write_partition(part: Partition, out: Path) -> dict[str, Path]:
    """Per client: `NAME.tokens.npy` (token ids) and `NAME.docs.npy` (document indices into the
    train split); plus `partition.json` and `partition.png`."""
    from skyfed.partition_report import plot_partition

    out.mkdir(parents=True, exist_ok=True)
    files: dict[str, Path] = {}
    for name, idx, shard in zip(part.names, part.doc_indices, part.shards):
        np.save(out / f"{name}.tokens.npy", np.asarray(shard.tokens))
        np.save(out / f"{name}.docs.npy", idx.astype(np.int64))
        files[name] = out / f"{name}.tokens.npy"
    (out / "partition.json").write_text(json.dumps(part.stats, indent=2) + "\n")
    plot_partition(part.stats, out / "partition.png")
    files["report"] = out / "partition.json"
    files["plot"] = out / "partition.png"
    return files
