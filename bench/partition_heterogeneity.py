"""Is a Dirichlet partition heterogeneous for training, not only for the statistic?

    PYTHONPATH=src python bench/partition_heterogeneity.py --out bench/results/partition_heterogeneity.json

Splits WikiText-2 across 3 clients twice, IID (the baseline, measured in the same run)
and Dirichlet(alpha) over k-means topics (skyfed.data.partition). Each client's data is
cut into train (first 90% of its documents' tokens) and held-out (last 10%). From one
shared initialisation, each client trains its own gpt2-tiny for `--steps` AdamW steps
on its train part; then every client's model is evaluated on every client's held-out
part: a 3x3 loss matrix per partition. The gap (mean off-diagonal - mean diagonal loss)
says how much worse a model does on other clients' data than on its own.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from skyfed.config import load_config
from skyfed.runtime.partitioning import plan_partition
from skyfed.runtime.setup import cache_dir, new_model
from skyfed.data.corpus import load_corpus
from skyfed.data.shards import tokenize_documents
from skyfed.data.tokenizer import get_tokenizer
from skyfed.model import resolve_device
from skyfed.train import LocalTrainer, evaluate


def loss_matrix(cfg, train_shard, vocab, tokenizer, init_state, steps: int, eval_batches: int) -> dict:
    names = [c.name for c in cfg.federation.clients]
    part = plan_partition(cfg, train_shard, names, vocab)
    train_parts, held = [], []
    for shard in part.shards:
        cut = int(len(shard.tokens) * 0.9)
        train_parts.append(np.asarray(shard.tokens[:cut]))
        held.append(np.asarray(shard.tokens[cut:]))
    device = resolve_device("auto")
    matrix = np.zeros((len(names), len(names)))
    seconds = 0.0
    for i, name in enumerate(names):
        model = new_model(cfg, tokenizer)
        model.load_state_dict(copy.deepcopy(init_state))
        trainer = LocalTrainer(model, cfg.train, device, steps)
        torch.manual_seed(cfg.seed)
        t0 = time.perf_counter()
        trainer.train(train_parts[i], steps, np.random.default_rng([cfg.seed, i]))
        seconds += time.perf_counter() - t0
        for j in range(len(names)):
            matrix[i, j] = evaluate(model, held[j], cfg.train.seq_len, cfg.eval.batch_size, device, eval_batches).loss
    n = len(names)
    diag = float(np.mean(np.diag(matrix)))
    off = float(matrix[~np.eye(n, dtype=bool)].mean())
    return {
        "method": part.stats["method"],
        "clients": names,
        "tokens": {n_: c["tokens"] for n_, c in part.stats["clients"].items()},
        "topic_hist": {n_: c["topic_hist"] for n_, c in part.stats["clients"].items()},
        "heterogeneity_jsd": part.stats["heterogeneity_jsd"],
        "loss_matrix": matrix.round(4).tolist(),  # row: the model of client i; column: held-out data of client j
        "mean_own_loss": diag,
        "mean_other_loss": off,
        "gap": off - diag,
        "train_seconds": seconds,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--alpha", type=float, default=0.1)
    ap.add_argument("--eval-batches", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="bench/results/partition_heterogeneity.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = load_config(overrides=[f"seed={args.seed}", "train.warmup_steps=20", f"train.local_steps={args.steps}"])
    d = cfg.data
    corpus = load_corpus(d.path, d.format, d.valid_path, d.valid_fraction, cfg.seed)
    tokenizer, key = get_tokenizer(corpus.train, cfg.tokenizer.vocab_size, cfg.tokenizer.min_frequency, cache_dir(), None)
    train = tokenize_documents(corpus.train, tokenizer, key, cache_dir())
    init_state = copy.deepcopy(new_model(cfg, tokenizer).state_dict())
    results = {}
    for method in ("iid", "dirichlet"):
        c = load_config(overrides=[f"seed={args.seed}", f"data.partition.method={method}", f"data.partition.alpha={args.alpha}"])
        results[method] = loss_matrix(c, train, len(tokenizer), tokenizer, init_state, args.steps, args.eval_batches)
        print(method, json.dumps(results[method]["loss_matrix"]), "gap", round(results[method]["gap"], 4), flush=True)
    report = {
        "benchmark": "partition_heterogeneity",
        "command": f"PYTHONPATH=src python bench/partition_heterogeneity.py --steps {args.steps} --alpha {args.alpha}",
        "model": cfg.model.preset, "steps": args.steps, "alpha": args.alpha, "seed": args.seed,
        "batch_size": cfg.train.batch_size, "seq_len": cfg.train.seq_len, "eval_batches": args.eval_batches,
        "cpu_threads": args.threads, "machine_cpus": os.cpu_count(),
        "results": results,
        "gap_ratio_dirichlet_vs_iid": results["dirichlet"]["gap"] / results["iid"]["gap"] if results["iid"]["gap"] else None,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
