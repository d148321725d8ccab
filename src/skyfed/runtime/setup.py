"""Everything a run needs before round 0: data, tokenizer, shards, models, clients.

Shared by the simulation, the baselines and the gRPC server and client, so that what
is tested in simulation is what runs in deployment.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from skyfed.config import ExperimentConfig
from skyfed.data.corpus import load_corpus, read_documents
from skyfed.data.shards import TokenShard, tokenize_documents
from skyfed.errors import DataError
from skyfed.federation.client import FederatedClient
from skyfed.security.client import client_privacy  # skyfed.security hook
from skyfed.model import build_model, federated_parameter_names, num_parameters, resolve_device
from skyfed.runtime.pretrained import experiment_tokenizer  # finetune
from skyfed.train import EvalResult, LocalTrainer, evaluate, unigram_perplexity

log = logging.getLogger(__name__)


def cache_dir() -> Path:
    return Path(os.environ.get("SKYFED_CACHE", Path.home() / ".cache" / "skyfed"))


@dataclass
class PreparedData:
    tokenizer: object  # a transformers PreTrainedTokenizerFast
    tokenizer_key: str
    train: TokenShard
    valid: TokenShard
    client_tokens: dict[str, np.ndarray]
    client_docs: dict[str, int]
    unigram_ppl: float
    partition: object | None = None  # skyfed.runtime.partitioning.Partition (None: every client has its own data)


def apply_threads(cfg: ExperimentConfig) -> None:
    """The thread policy of a training process (docs/speed.md): `threads` torch intra-op
    threads for this process (the simulation, `skyfed server`, `skyfed client`), or torch's
    default (one per physical core) when unset. A worker that trains beside others gets
    its own share instead: a Ray actor sets `max(1, ray.num_cpus_per_actor)` threads, 1 by
    default (skyfed.runtime.replica), so parallel clients do not oversubscribe the cores."""
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)


def prepare_data(cfg: ExperimentConfig) -> PreparedData:
    """Load, tokenize (cached) and partition the corpus; clients with `data` get their own."""
    d = cfg.data
    # --- finetune: data.text_column; a folder of too few files is read as paragraphs (one doc per
    # client at least); a pretrained model's own tokenizer; data.topics selects documents
    n_shared = max(1, sum(1 for c in cfg.federation.clients if c.data is None))
    corpus = load_corpus(d.path, d.format, d.valid_path, d.valid_fraction, cfg.seed, d.text_column, n_shared)
    tokenizer, tok_key = experiment_tokenizer(cfg, corpus.train, cache_dir())
    train = tokenize_documents(corpus.train, tokenizer, tok_key, cache_dir())
    valid = tokenize_documents(corpus.valid, tokenizer, tok_key, cache_dir())
    if d.topics is not None:
        from skyfed.data.topics import select_topics

        seed = cfg.seed if d.partition.seed is None else d.partition.seed
        train, valid = select_topics(train, valid, d.topics, d.partition.num_topics, seed)
    train, valid = train.truncate(d.max_train_tokens), valid.truncate(d.max_valid_tokens)
    # --- end finetune
    need = cfg.train.seq_len + 2
    if valid.num_tokens < need:
        raise DataError(f"{d.valid_path or d.path}: validation split has {valid.num_tokens} tokens, need at least {need}")
    specs = cfg.federation.clients
    shared = [c.name for c in specs if c.data is None]
    client_tokens: dict[str, np.ndarray] = {}
    client_docs: dict[str, int] = {}
    part = None
    if shared:
        from skyfed.runtime.partitioning import plan_partition

        part = plan_partition(cfg, train, shared, len(tokenizer))
        for name, shard in zip(shared, part.shards):
            client_tokens[name], client_docs[name] = shard.tokens, shard.num_docs
    for spec in specs:
        if spec.data is not None:
            docs = read_documents(spec.data, d.format, d.text_column)  # finetune: text_column
            shard = tokenize_documents(docs, tokenizer, tok_key, cache_dir())
            client_tokens[spec.name], client_docs[spec.name] = shard.tokens, shard.num_docs
    for name, tokens in client_tokens.items():
        if len(tokens) < need:
            raise DataError(f"client {name!r} has {len(tokens)} training tokens, need at least {need} for one window")
    ordered = {c.name: client_tokens[c.name] for c in specs}
    if any(c.degrade is not None for c in specs):
        from skyfed.data.degrade import degrade_clients

        ordered = degrade_clients(cfg, ordered, len(tokenizer))  # federation.clients[].degrade; valid stays clean
    pooled = np.concatenate(list(ordered.values()))
    return PreparedData(
        tokenizer, tok_key, train, valid, ordered, client_docs, unigram_perplexity(pooled, valid.tokens, len(tokenizer)),
        part,
    )


def new_model(cfg: ExperimentConfig, tokenizer, lora_rank: int | None = None) -> torch.nn.Module:
    return build_model(
        cfg.model.preset, len(tokenizer), tokenizer.eos_token_id, cfg.model.overrides, cfg.model.path, cfg.seed,
        dtype=cfg.model.dtype, peft=cfg.model.peft,  # finetune: weights' dtype, LoRA adapter
        lora_rank=lora_rank,  # a client's smaller LoRA rank (HetLoRA, skyfed.lora_ranks)
    )


def make_evaluator(cfg: ExperimentConfig, valid_tokens: np.ndarray, device: torch.device):
    def run_eval(model: torch.nn.Module, max_batches: int | None, max_tokens: int | None = None) -> EvalResult:
        return evaluate(model, valid_tokens, cfg.train.seq_len, cfg.eval.batch_size, device, max_batches, max_tokens)

    return run_eval


def client_seed(cfg: ExperimentConfig, index: int) -> int:
    """The seed of the `index`-th client of the config (its batches and codec salts)."""
    return cfg.seed * 1000 + index


def make_client(
    cfg: ExperimentConfig, name: str, index: int, tokens: np.ndarray, tokenizer, device: torch.device
) -> FederatedClient:
    from skyfed.federation.steps import client_schedules
    from skyfed.lora_ranks import client_rank

    model = new_model(cfg, tokenizer, client_rank(cfg, name))
    schedule = client_schedules(cfg, num_parameters(model)).get(name, cfg.federation.rounds * cfg.train.local_steps)
    trainer = LocalTrainer(model, cfg.train, device, schedule)
    client = FederatedClient(
        name, tokens, trainer, federated_parameter_names(model), seed=client_seed(cfg, index),
        max_payload_bytes=cfg.federation.max_update_bytes, compression=cfg.compression,
        privacy=client_privacy(cfg),  # skyfed.security hook: DP clipping, noise share, DP-SGD
    )
    if cfg.security.secure_aggregation:
        from skyfed.security.secagg.participant import SecAggParticipant

        client.secagg = SecAggParticipant.for_config(name, client.spec, cfg)
    if cfg.model.peft is not None and cfg.model.peft.aggregation == "exact":
        from skyfed.lora_exact import BaseReceiver

        client.base = BaseReceiver(model)  # FedEx-LoRA: applies the residuals folded into the base weights
    return client


def device_for(cfg: ExperimentConfig) -> torch.device:
    return resolve_device(cfg.device)
