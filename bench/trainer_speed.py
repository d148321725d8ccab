"""Tokens/s of skyfed's local trainer against a plain PyTorch loop, in the same run.

    PYTHONPATH=src python bench/trainer_speed.py                 # gpt2-tiny and gpt2-124m, every setting
    PYTHONPATH=src python bench/trainer_speed.py --quick --out /tmp/trainer_speed.json   # a check that it runs

Both sides train the same model (`build_model`, seed 0, vocabulary 4096 as the default
tokenizer's), on the same batches (`sample_windows` of one random token array with the
same seed; token values do not change the cost of a dense model), on `--device` (cpu by
default), with the same batch,
seq_len, learning rate, betas, weight decay and gradient clipping (1.0).

- The plain loop is what a user writes: `torch.optim.AdamW(model.parameters())` with
  torch's default kernel (a per-parameter loop on CPU, foreach on CUDA), forward,
  cross-entropy, backward, `clip_grad_norm_`, step, `loss.item()` each step.
- skyfed is `LocalTrainer.train` with each `train.optimizer_impl` and `train.compile`
  setting asked for (`train.autocast` stays at auto: off on CPU, bf16 on CUDA).

Each setting builds a fresh model, runs `--warmup` steps (their time, which includes
compiling, is reported as `warmup_s`), then `--steps` timed steps; the sweep over the
settings is repeated `--repeats` times, in the same order, and the median tokens/s is
reported with every repeat's value, and so are tokens per CPU-second of the process
(`time.process_time`), which other work on a shared machine disturbs less than the
wall clock (compare those with `--threads 1`: idle threads that spin count too). The JSON holds the command, torch version, threads,
CPU count and the load average before and after: on a shared machine compare only
numbers from the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from skyfed.config import TrainConfig
from skyfed.model import build_model, num_parameters, resolve_device
from skyfed.train import LocalTrainer, sample_windows

VOCAB = 4096
# preset: (batch, seq_len, timed steps, warmup steps) of the full run
PRESETS = {"gpt2-tiny": (16, 128, 30, 3), "gpt2-124m": (2, 128, 4, 1)}
QUICK = {"gpt2-tiny": (4, 32, 3, 1), "gpt2-124m": (1, 16, 1, 1)}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def plain_loop(model: torch.nn.Module, cfg: TrainConfig, tokens: np.ndarray, steps: int, rng, device) -> float:
    """`steps` steps of the loop a user writes; returns the last loss."""
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    model.train()
    loss = None
    for _ in range(steps):
        batch = sample_windows(tokens, cfg.batch_size, cfg.seq_len, rng).to(device)
        logits = model(input_ids=batch[:, :-1]).logits
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), batch[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        loss = loss.item()
    return loss


def measure(preset: str, setting: dict, tokens: np.ndarray, shape: tuple[int, int, int, int], device) -> dict:
    """One fresh model trained with `setting` ({"side": plain} or skyfed's impl/compile)."""
    batch, seq_len, steps, warmup = shape
    model = build_model(preset, VOCAB, 0, seed=0).to(device)
    rng = np.random.default_rng(1)
    out: dict = {}
    if setting["side"] == "plain":
        cfg = TrainConfig(batch_size=batch, seq_len=seq_len)
        t0 = time.perf_counter()
        plain_loop(model, cfg, tokens, warmup, rng, device)
        sync(device)
        t1, c1 = time.perf_counter(), time.process_time()
        out["loss_last"] = plain_loop(model, cfg, tokens, steps, rng, device)
        sync(device)
        t2, c2 = time.perf_counter(), time.process_time()
    else:
        cfg = TrainConfig(batch_size=batch, seq_len=seq_len, optimizer_impl=setting["impl"], compile=setting["compile"])
        trainer = LocalTrainer(model, cfg, device, total_steps=warmup + steps)
        t0 = time.perf_counter()
        trainer.train(tokens, warmup, rng)
        sync(device)
        t1, c1 = time.perf_counter(), time.process_time()
        out["loss_last"] = trainer.train(tokens, steps, rng).loss_last
        sync(device)
        t2, c2 = time.perf_counter(), time.process_time()
        out["optimizer_impl"] = trainer.optimizer_impl
        out["compiled"] = trainer.runner.compiling
    tokens_timed = steps * batch * seq_len
    out.update(warmup_s=t1 - t0, seconds=t2 - t1, tokens_per_s=tokens_timed / (t2 - t1),
               tokens_per_cpu_s=tokens_timed / (c2 - c1))
    return out


def settings(impls: list[str], compiles: list[str]) -> list[dict]:
    rows = [{"name": "plain_loop", "side": "plain"}]
    for c in compiles:
        for impl in impls:
            rows.append({"name": f"skyfed_{impl}_compile_{c}", "side": "skyfed", "impl": impl, "compile": c})
    return rows


def bench_preset(preset: str, shape, impls, compiles, repeats: int, device: torch.device) -> dict:
    tokens = np.random.default_rng(0).integers(0, VOCAB, 200_000).astype(np.int32)
    rows = settings(impls, compiles)
    runs: dict[str, list[dict]] = {r["name"]: [] for r in rows}
    for rep in range(repeats):
        for row in rows:
            runs[row["name"]].append(measure(preset, row, tokens, shape, device))
            last = runs[row["name"]][-1]
            print(f"{preset} rep {rep} {row['name']:32s} {last['tokens_per_s']:9.0f} tok/s "
                  f"{last['tokens_per_cpu_s']:9.0f} tok/cpu-s (warmup {last['warmup_s']:.1f} s)", flush=True)
    base = statistics.median(r["tokens_per_s"] for r in runs["plain_loop"])
    result = {"batch_size": shape[0], "seq_len": shape[1], "steps": shape[2], "warmup_steps": shape[3],
              "parameters": num_parameters(build_model(preset, VOCAB, 0, seed=0)), "settings": {}}
    for row in rows:
        reps = runs[row["name"]]
        med = statistics.median(r["tokens_per_s"] for r in reps)
        result["settings"][row["name"]] = {
            **{k: v for k, v in row.items() if k != "name"},
            "tokens_per_s_median": med, "speedup_vs_plain_loop": med / base,
            "tokens_per_cpu_s_median": statistics.median(r["tokens_per_cpu_s"] for r in reps),
            "tokens_per_cpu_s": [r["tokens_per_cpu_s"] for r in reps],
            "tokens_per_s": [r["tokens_per_s"] for r in reps], "warmup_s": [r["warmup_s"] for r in reps],
            "loss_last": [r["loss_last"] for r in reps],
            **{k: reps[-1][k] for k in ("optimizer_impl", "compiled") if k in reps[-1]},
        }
    return result


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", default="gpt2-tiny,gpt2-124m")
    ap.add_argument("--impls", default="plain,foreach,fused", help="train.optimizer_impl values")
    ap.add_argument("--compile", default="off,on", help="train.compile values")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--steps", type=int, default=None, help="timed steps per setting (default: per preset)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's, all cores)")
    ap.add_argument("--device", default="cpu", help="cpu, cuda, or auto (skyfed.model.resolve_device)")
    ap.add_argument("--quick", action="store_true", help="tiny shapes, 1 repeat: checks that the script runs")
    ap.add_argument("--out", type=Path, default=Path("bench/results/trainer_speed.json"))
    args = ap.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    shapes = QUICK if args.quick else PRESETS
    repeats = 1 if args.quick else args.repeats
    load_before = os.getloadavg()
    results = {}
    for preset in args.presets.split(","):
        if preset not in shapes:
            sys.exit(f"--presets: no shape for {preset!r} (known: {', '.join(shapes)})")
        shape = shapes[preset] if args.steps is None else (*shapes[preset][:2], args.steps, shapes[preset][3])
        results[preset] = bench_preset(preset, shape, args.impls.split(","), args.compile.split(","), repeats, device)
    report = {
        "benchmark": "trainer_speed",
        "command": "python bench/trainer_speed.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "quick": args.quick, "repeats": repeats, "vocab_size": VOCAB, "device": str(device),
        "machine": {"platform": platform.platform(), "torch": torch.__version__, "threads": torch.get_num_threads(),
                    "cpu_count": os.cpu_count()},
        "load_average_before": load_before, "load_average_after": os.getloadavg(),
        "presets": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    return report


if __name__ == "__main__":
    main()
