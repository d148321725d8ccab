"""How far plain averaging of LoRA factors is from the average of the clients' updates.

    PYTHONPATH=src python bench/lora_factor_averaging.py --model runs/pretrain/model --set data.topics=[6,7] ...

FedAvg on a LoRA adapter averages A and B separately: the global update is
mean(B_i) mean(A_i), while the average of what the clients learned is mean(B_i A_i)
(FedEx-LoRA, Singhal et al. 2024, arXiv:2410.09432, fold the difference into the base
weights). This runs one federated round by hand (every client trains the same starting
adapter on its own shard for `train.local_steps` steps), then reports, per adapted
layer and in total, ||mean(B_i A_i) - mean(B_i) mean(A_i)||_F / ||mean(B_i A_i) - B_0 A_0||_F
and the validation perplexity of the base model plus either aggregate. Writes
bench/results/lora_factor_averaging.json with the command and the load average.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]


def lora_modules(model) -> dict[str, torch.nn.Module]:
    from peft.tuners.lora import LoraLayer

    return {n: m for n, m in model.named_modules() if isinstance(m, LoraLayer)}


@torch.no_grad()
def deltas(model) -> dict[str, torch.Tensor]:
    """Each LoRA layer's weight update (scaling * B A, laid out as the base weight)."""
    return {n: m.get_delta_weight("default").detach().clone() for n, m in lora_modules(model).items()}


@torch.no_grad()
def with_update(base, update: dict[str, torch.Tensor]):
    """A copy of the plain base model with `update` added to the adapted layers' weights."""
    model = copy.deepcopy(base)
    modules = dict(model.named_modules())
    for name, d in update.items():
        modules[name.removeprefix("base_model.model.")].weight += d
    return model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True, help="a pretrained model directory (bench/finetune.py's pretrain)")
    ap.add_argument("--set", action="append", default=[], dest="overrides")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "lora_factor_averaging.json"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    from transformers import AutoModelForCausalLM

    from skyfed.config import load_config
    from skyfed.model import federated_parameter_names, get_params, set_params
    from skyfed.runtime.setup import new_model, prepare_data
    from skyfed.train import LocalTrainer, evaluate

    overrides = ["threads=1", f"model.path={args.model}", "model.peft.method=lora", *args.overrides]
    cfg = load_config(None, "default", overrides)
    if cfg.model.peft is None:
        raise SystemExit("model.peft is required")
    data = prepare_data(cfg)
    cpu = torch.device("cpu")
    model = new_model(cfg, data.tokenizer)
    names = federated_parameter_names(model)
    start = get_params(model, names)
    weights, factors = [], []
    for i, (client, tokens) in enumerate(data.client_tokens.items()):
        trainer = LocalTrainer(new_model(cfg, data.tokenizer), cfg.train, cpu, cfg.train.local_steps)
        set_params(trainer.model, start)
        trainer.train(tokens, cfg.train.local_steps, np.random.default_rng([cfg.seed, i]))
        factors.append(get_params(trainer.model, names))
        weights.append(len(tokens))
    w = torch.tensor(weights, dtype=torch.float64) / sum(weights)
    exact: dict[str, torch.Tensor] = {}
    for wi, f in zip(w, factors):
        set_params(model, f)
        for n, d in deltas(model).items():
            exact[n] = exact.get(n, 0) + float(wi) * d
    set_params(model, {n: sum(float(wi) * f[n] for wi, f in zip(w, factors)) for n in names})
    plain = deltas(model)
    set_params(model, start)
    initial = deltas(model)
    layers = {}
    for n in exact:
        layers[n] = float((exact[n] - plain[n]).norm() / (exact[n] - initial[n]).norm())
    total = float(torch.sqrt(sum((exact[n] - plain[n]).norm() ** 2 for n in exact))
                  / torch.sqrt(sum((exact[n] - initial[n]).norm() ** 2 for n in exact)))
    base = AutoModelForCausalLM.from_pretrained(str(cfg.model.path))
    ev = lambda m: evaluate(m, data.valid.tokens, cfg.train.seq_len, cfg.eval.batch_size, cpu,  # noqa: E731
                            cfg.eval.final_max_batches).ppl
    report = {
        "command": "PYTHONPATH=src python " + " ".join(sys.argv),
        "loadavg": os.getloadavg(),
        "clients": list(data.client_tokens),
        "local_steps": cfg.train.local_steps,
        "lora": cfg.model.peft.model_dump(),
        "relative_error_total": total,
        "relative_error_by_layer": layers,
        "val_ppl": {"pretrained": ev(base), "plain_factor_average": ev(with_update(base, plain)),
                    "exact_average": ev(with_update(base, exact))},
    }
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
