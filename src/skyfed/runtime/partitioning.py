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


def plan_partition(cfg: ExperimentConfig, train: TokenShard, names: list[str], vocab_size: int) -> Partition:
    """Partition `train` across `names` (the clients without their own data)."""
    p = cfg.data.partition
    seed = cfg.seed if p.seed is None else p.seed
    topics = document_topics(train.tokens, train.offsets, p.num_topics, seed)
    shares = capacity_shares(cfg, names) if p.method == "capacity" else p.shares
    parts = partition_documents(
        p.method, train.doc_lengths(), len(names), seed, topics=topics, alpha=p.alpha, shares=shares, power=p.power
    )
    shards = [train.subset(idx) for idx in parts]
    stats = partition_stats(names, [s.tokens for s in shards], parts, topics, p.num_topics, vocab_size, p.method)
    stats.update(seed=seed, alpha=p.alpha if p.method == "dirichlet" else None, shares=shares)
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
