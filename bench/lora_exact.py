"""Exact LoRA aggregation (FedEx-LoRA) against plain factor averaging, with equal and with
heterogeneous ranks, on a small pretrained model.

    PYTHONPATH=src nice -n 10 python bench/lora_exact.py   # ~9 min on a 2-core machine at load 8-35
    PYTHONPATH=src python bench/lora_exact.py --model runs/pretrain/model --rounds 6

1. Unless --model names one, pretrain the tests' model (tests/finetune_fixtures.py): the
   smoke preset with gpt2-tiny at width 256, `--baseline sequential`, on WikiText-2
   topics 0-2 of 4; its run directory's `model/` is the pretrained model.
2. Fine-tune it federated (3 clouds, FedAvg, LoRA r=8 on c_attn) on topic 3, four ways:
   `model.peft.aggregation` factors / exact, with every client at rank 8 / with ranks
   {8, 4, 2} (HetLoRA zero-padding, skyfed.lora_ranks).

Reports per run and round the validation perplexity and the aggregation gap
||sum_i w_i B_i A_i - B A|| / ||the round's exact update|| (all layers; the factors runs
measure it with a measure-only `LoraServer`, which folds nothing), the final perplexity
on the whole validation split, and the bytes (the exact runs' base-weight residuals
included in bytes_down). Writes bench/results/lora_exact.json with the command and the
load average.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RANKS = "federation.clients=[{name: aws, lora_r: 8}, {name: gcp, lora_r: 4}, {name: azure, lora_r: 2}]"
SMOKE = ["model.preset=gpt2-tiny", "model.overrides.n_embd=256", "data.partition.num_topics=4"]


def pretrain(out: Path) -> Path:
    import subprocess

    args = ["run", "--preset", "smoke", "--baseline", "sequential", "--out", str(out)]
    for item in [*SMOKE, "data.topics=[0,1,2]", "threads=1"]:
        args += ["--set", item]
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    res = subprocess.run([sys.executable, "-m", "skyfed", *args], capture_output=True, text=True, env=env, timeout=3600)
    if res.returncode != 0:
        raise SystemExit(f"pretraining failed:\n{res.stderr[-3000:]}")
    return out / "model"


def finetune(overrides: list[str], out: Path) -> dict:
    """One federated run; the factor-averaging runs measure their gap without folding."""
    from skyfed.config import load_config
    from skyfed.lora_server import LoraServer
    from skyfed.runtime.assemble import assemble, finish
    from skyfed.runtime.simulation import simulated_transport

    cfg = load_config(preset="smoke", overrides=overrides)
    run = assemble(cfg, simulated_transport, out)
    core = run.engine.core
    if core.lora is None:
        core.lora = LoraServer(core.model, core.spec, core.strategy, cfg.compression, run.transport.client_names())
    core.lora.measure = True
    try:
        run.engine.run()
    finally:
        run.transport.close()
    summary = finish(run, {})
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {
        "final_val_ppl": summary["final"]["val_ppl"],
        "val_tokens": summary["final"]["val_tokens"],
        "val_ppl_by_round": [r["val_ppl"] for r in rows],
        "gap_by_round": [r["lora"].get("gap") for r in rows],
        "bytes_up": summary["total"]["bytes_up"],
        "bytes_down": summary["total"]["bytes_down"],
        "base_bytes_down": sum(r["lora"].get("base_bytes_down_total", 0) for r in rows),
        "bytes_up_by_client_round": rows[-1]["bytes_up_by_client"],
        "wall_time_s": summary["wall_time_s"],
    }


def pretrained_ppl(model_dir: Path, overrides: list[str]) -> float:
    import torch
    from transformers import AutoModelForCausalLM

    from skyfed.config import load_config
    from skyfed.runtime.setup import prepare_data
    from skyfed.train import evaluate

    cfg = load_config(preset="smoke", overrides=overrides)
    data = prepare_data(cfg)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir))
    return evaluate(model, data.valid.tokens, cfg.train.seq_len, cfg.eval.batch_size, torch.device("cpu"),
                    cfg.eval.final_max_batches).ppl


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", help="a pretrained model directory (default: pretrain the tests' model)")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "lora_exact.json"))
    args = ap.parse_args()
    import torch

    torch.set_num_threads(1)
    started = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="skyfed-lora-exact-"))
    model = Path(args.model) if args.model else pretrain(work / "pretrain")
    common = ["threads=1", *SMOKE, "data.topics=[3]", f"model.path={model}", "model.peft.method=lora",
              "model.peft.r=8", f"train.lr={args.lr}", f"federation.rounds={args.rounds}",
              f"train.local_steps={args.steps}"]
    runs = {}
    for name, extra in {
        "factors_r8": [], "exact_r8": ["model.peft.aggregation=exact"],
        "factors_r842": [RANKS], "exact_r842": ["model.peft.aggregation=exact", RANKS],
    }.items():
        runs[name] = finetune([*common, *extra], work / name)
        print(name, json.dumps(runs[name]), flush=True)
    report = {
        "command": "PYTHONPATH=src python " + " ".join(sys.argv),
        "loadavg": os.getloadavg(),
        "setup": {"model": "gpt2-tiny width 256 (1.74M params), smoke preset", "pretrain_topics": [0, 1, 2],
                  "finetune_topics": [3], "clients": 3, "strategy": "fedavg", "lora": "r=8 alpha=16 on c_attn",
                  "rounds": args.rounds, "local_steps": args.steps, "lr": args.lr,
                  "pretrained_model": "given" if args.model else "pretrained by this bench"},
        "pretrained_val_ppl": pretrained_ppl(model, common),
        "runs": runs,
        "bench_wall_s": time.perf_counter() - started,
    }
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
