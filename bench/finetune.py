"""Pretrain on some WikiText-2 topics, then fine-tune federated on the others (LoRA and full).

    PYTHONPATH=src python bench/finetune.py                      # ~25 min on a loaded 2-core machine
    PYTHONPATH=src python bench/finetune.py --pretrain-rounds 6 --rounds 4 --steps 40   # longer

1. `skyfed run --baseline sequential` of the default experiment (gpt2-tiny, a 4096-token
   BPE) on topics 0-5 of 8 (`data.topics`, k-means topics of skyfed.data.topics): the
   run directory's `model/` is the pretrained model, with its tokenizer.
2. Federated fine-tuning (3 clouds, FedAvg) of that model on topics 6-7:
   LoRA r=8 (`model.peft`), LoRA r=8 with an int8 uplink, and full fine-tuning.

Reports the pretrained model's perplexity on the fine-tuning topics' validation split
(the same windows as each run's final evaluation), each run's final perplexity, and the
bytes per client per round against the adapter's (or model's) fp32 size. Writes
bench/results/finetune.json with the command line and the load average.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def cli(*args: str) -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    res = subprocess.run([sys.executable, "-m", "skyfed", *args], capture_output=True, text=True, env=env, timeout=3600)
    if res.returncode != 0:
        raise SystemExit(f"skyfed {' '.join(args)} failed:\n{res.stderr[-3000:]}")


def sets(items: list[str]) -> list[str]:
    return [x for item in items for x in ("--set", item)]


def pretrained_ppl(model_dir: Path, run_dir: Path) -> dict[str, float]:
    """The pretrained model on the fine-tuning run's validation windows."""
    import torch
    import yaml
    from transformers import AutoModelForCausalLM

    from skyfed.config import ExperimentConfig
    from skyfed.runtime.setup import prepare_data
    from skyfed.train import evaluate

    cfg = ExperimentConfig.model_validate(yaml.safe_load((run_dir / "config.yaml").read_text()))
    data = prepare_data(cfg)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir))
    ev = evaluate(model, data.valid.tokens, cfg.train.seq_len, cfg.eval.batch_size, torch.device("cpu"),
                  cfg.eval.final_max_batches)
    return {"val_ppl": ev.ppl, "val_tokens": ev.tokens}


def run_summary(run_dir: Path, fp32_payload: int) -> dict:
    summary = json.loads((run_dir / "summary.json").read_text())
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    per_client = [b for r in rows for b in r["bytes_up_by_client"].values()]
    return {
        "final_val_ppl": summary["final"]["val_ppl"],
        "val_tokens": summary["final"]["val_tokens"],
        "bytes_up_per_client_round": max(per_client),
        "fp32_payload_bytes": fp32_payload,
        "bytes_over_fp32": max(per_client) / fp32_payload,
        "total_bytes": summary["total"]["bytes"],
        "wall_time_s": summary["wall_time_s"],
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pretrain-rounds", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--final-batches", type=int, default=20)
    ap.add_argument("--lora-lr", type=float, default=5e-3)
    ap.add_argument("--full-lr", type=float, default=1e-3)
    ap.add_argument("--runs", default="lora_r8,lora_r8_int8_up,full", help="which fine-tuning runs, comma-separated")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "finetune.json"))
    args = ap.parse_args()
    from safetensors import safe_open

    import torch

    torch.set_num_threads(1)
    common = ["threads=1", "data.partition.num_topics=8", f"train.local_steps={args.steps}", "train.warmup_steps=5",
              f"eval.final_max_batches={args.final_batches}"]
    work = Path(tempfile.mkdtemp(prefix="skyfed-finetune-"))
    started = time.perf_counter()
    pre = work / "pretrain"
    cli("run", "--baseline", "sequential", "--out", str(pre),
        *sets(common + ["data.topics=[0,1,2,3,4,5]", f"federation.rounds={args.pretrain_rounds}"]))
    model_dir = pre / "model"
    tune = common + ["data.topics=[6,7]", f"federation.rounds={args.rounds}", f"model.path={model_dir}"]
    lora = ["model.peft.method=lora", "model.peft.r=8", f"train.lr={args.lora_lr}"]
    runs = {
        "lora_r8": lora,
        "lora_r8_int8_up": lora + ["compression.uplink=[int8]"],
        "full": [f"train.lr={args.full_lr}"],
    }
    results = {}
    runs = {k: v for k, v in runs.items() if k in args.runs.split(",")}
    for name, extra in runs.items():
        out = work / name
        cli("run", "--out", str(out), *sets(tune + extra))
        if (out / "adapter").is_dir():  # the adapter's fp32 size, from the saved adapter
            with safe_open(str(out / "adapter" / "adapter_model.safetensors"), "pt") as f:
                fp32 = sum(4 * f.get_tensor(k).numel() for k in f.keys())
        else:  # every trainable tensor's fp32 size (metrics.jsonl counts it per round, all clients)
            first = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
            fp32 = first["fp32_bytes_up"] // len(first["bytes_up_by_client"])
        results[name] = run_summary(out, fp32)
    before = pretrained_ppl(model_dir, work / "lora_r8")
    pre_summary = json.loads((pre / "summary.json").read_text())
    report = {
        "command": "PYTHONPATH=src python " + " ".join(sys.argv),
        "loadavg": os.getloadavg(),
        "pretrain": {"topics": [0, 1, 2, 3, 4, 5], "val_ppl_own_topics": pre_summary["final"]["val_ppl"],
                     "rounds": args.pretrain_rounds, "steps_per_round": 3 * args.steps},
        "finetune": {"rounds": args.rounds, "local_steps": args.steps, "clients": 3, "strategy": "fedavg",
                     "lora_lr": args.lora_lr, "full_lr": args.full_lr},
        "finetune_topics": [6, 7],
        "pretrained_on_finetune_topics": before,
        "runs": results,
        "bench_wall_s": time.perf_counter() - started,
    }
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
