"""skyfed FedAvg vs Flower FedAvg, side by side in one invocation.

    make bench-flower                                         # sets up .venv-flower, then runs this
    PYTHONPATH=src python bench/vs_flower.py                  # 3 clients x 10 rounds x 40 steps, gpt2-tiny
    PYTHONPATH=src python bench/vs_flower.py --rounds 2 --steps 5 --flower-python .venv-flower/bin/python
    PYTHONPATH=src python bench/vs_flower.py --compressed-set 'compression.uplink=[int8]'

Flower is a benchmark-only dependency: its side runs as a subprocess under a separate
venv (`--flower-python`, default /work/flwr-venv/bin/python, else .venv-flower), with
PYTHONPATH pointing at this repo's src so it trains with skyfed's model and trainer.

Same on both sides: the model (skyfed's `build_model`, same init seed), the data split
(the client token arrays of `prepare_data`, saved to .npy for Flower), rounds, local
steps, batch, AdamW with the warmup + cosine schedule, the sampling seeds of every client
and round, the tensors exchanged (the federated parameters in fp32), token-weighted
FedAvg, and a centralized evaluation of the global model after every round on the same
validation windows. AdamW state: skyfed keeps it across rounds by default, a Flower
ClientApp is stateless, so this benchmark sets `train.optimizer_state=reset` on the
skyfed side (fresh AdamW every round on both sides, the schedule's step carried over).
The final perplexities should therefore agree to float rounding - a correctness check.

Both sides run as fresh processes and are timed from the outside (total wall, including
imports, start-up and shutdown) and from the inside (per round). Local training time is
`LocalTrainer.train`'s own measurement on both sides; framework overhead = wall - local
training - evaluation. Bytes: skyfed's are exact lengths from metrics.jsonl; Flower's are
the serialized ArrayRecord (record + arrays + chunks) and Flower's own `count_bytes()`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def default_flower_python() -> str:
    for cand in (Path("/work/flwr-venv/bin/python"), ROOT / ".venv-flower" / "bin" / "python"):
        if cand.exists():
            return str(cand)
    return str(ROOT / ".venv-flower" / "bin" / "python")


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT / "src") + os.pathsep + env.get("PYTHONPATH", "")
    return env


def run_skyfed(preset: str, overrides: list[str], out: Path) -> dict:
    """`skyfed run` in a fresh process; the figures from its run directory."""
    cmd = [sys.executable, "-m", "skyfed", "run", "--preset", preset, "--out", str(out), "--quiet"]
    for o in overrides:
        cmd += ["--set", o]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env())
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"skyfed run failed:\n{proc.stderr[-3000:]}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((out / "summary.json").read_text())
    train = sum(sum(r["compute_s"].values()) for r in rows)
    final_eval = summary["wall_time_s"] - rows[-1]["elapsed_s"]  # final evaluation + saving the HF model dir
    evals = sum(r["eval_s"] for r in rows) + final_eval
    rounds_wall = sum(r["wall_time_s"] for r in rows)
    n_clients = len(rows[0]["bytes_up_by_client"])
    return {
        "final": summary["final"],
        "wall_s": wall,
        "rounds_wall_s": rounds_wall,
        "train_s": train,
        "eval_s": evals,
        "final_eval_and_save_s": final_eval,
        "not_training_s": wall - train,
        "framework_overhead_s": wall - train - evals,
        "steady_round_overhead_s": _median([r["wall_time_s"] - sum(r["compute_s"].values()) - r["eval_s"] for r in rows[1:]]),
        "bytes_up_per_client_round": summary["total"]["bytes_up"] / (len(rows) * n_clients),
        "bytes_down_per_client_round": summary["total"]["bytes_down"] / (len(rows) * n_clients),
        "summary_total": summary["total"],
        "val_ppl_by_round": [r["val_ppl"] for r in rows],
    }


def run_flower(python: str, spec: dict, spec_path: Path) -> dict:
    spec_path.write_text(json.dumps(spec))
    t0 = time.perf_counter()
    proc = subprocess.run([python, str(ROOT / "bench" / "flower_side.py"), str(spec_path)],
                          capture_output=True, text=True, env=_env())
    wall = time.perf_counter() - t0
    if proc.returncode != 0 or not Path(spec["result"]).exists():
        raise SystemExit(f"Flower side failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}")
    res = json.loads(Path(spec["result"]).read_text())
    rounds = res["rounds"]
    train = sum(sum(t) for t in res["train_seconds"])
    evals = sum(r["eval_s"] for r in rounds) + res["final_eval_s"]
    per_round_train = [sum(t) for t in res["train_seconds"]]
    return {
        "final": res["final"],
        "wall_s": wall,
        "rounds_wall_s": sum(r["wall_s"] for r in rounds),
        "train_s": train,
        "eval_s": evals,
        "import_s": res["import_s"],
        "run_simulation_s": res["run_simulation_s"],
        "not_training_s": wall - train,
        "framework_overhead_s": wall - train - evals,
        "steady_round_overhead_s": _median([r["wall_s"] - t - r["eval_s"] for r, t in zip(rounds[1:], per_round_train[1:])]),
        "bytes_up_per_client_round": res["bytes_up"],
        "bytes_down_per_client_round": res["bytes_down"],
        "count_bytes_up": res["count_bytes_up"],
        "count_bytes_down": res["count_bytes_down"],
        "val_ppl_by_round": [r["val_ppl"] for r in rounds],
    }


def _median(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--preset", default="default")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads per side (and Ray CPUs per client)")
    ap.add_argument("--flower-python", default=default_flower_python())
    ap.add_argument("--skyfed-set", action="append", default=[], help="extra --set for both skyfed runs")
    ap.add_argument("--compressed-set", action="append", default=[],
                    help="--set for an extra skyfed run with compression, e.g. 'compression.uplink=[int8]'")
    ap.add_argument("--flower-first", action="store_true", help="run the Flower side first (order effects on a busy machine)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "vs_flower.json")
    args = ap.parse_args(argv)

    from skyfed.config import load_config
    from skyfed.runtime.setup import prepare_data

    overrides = [f"federation.rounds={args.rounds}", f"train.local_steps={args.steps}", "train.optimizer_state=reset",
                 f"threads={args.threads}", "device=cpu", *args.skyfed_set]
    cfg = load_config(preset=args.preset, overrides=overrides)
    data = prepare_data(cfg)
    results: dict = {}
    with tempfile.TemporaryDirectory(prefix="vs-flower-") as tmp:
        tmp = Path(tmp)
        paths = []
        for i, (name, tokens) in enumerate(data.client_tokens.items()):
            paths.append(str(tmp / f"client{i}-{name}.npy"))
            np.save(paths[-1], np.asarray(tokens))
        np.save(tmp / "valid.npy", np.asarray(data.valid.tokens))
        spec = {
            "seed": cfg.seed, "clients": len(paths), "client_tokens": paths, "valid_tokens": str(tmp / "valid.npy"),
            "rounds": args.rounds, "local_steps": args.steps, "threads": args.threads,
            "model": {"preset": cfg.model.preset, "vocab_size": len(data.tokenizer),
                      "eos_token_id": data.tokenizer.eos_token_id, "overrides": cfg.model.overrides},
            "train": cfg.train.model_dump(mode="json"),
            "eval": {"seq_len": cfg.train.seq_len, "batch_size": cfg.eval.batch_size,
                     "max_batches": cfg.eval.max_batches, "final_max_batches": cfg.eval.final_max_batches},
            "result": str(tmp / "flower-result.json"),
        }
        if args.flower_first:
            results["flower"] = run_flower(args.flower_python, spec, tmp / "spec.json")
        results["skyfed"] = run_skyfed(args.preset, overrides, tmp / "skyfed")
        if not args.flower_first:
            results["flower"] = run_flower(args.flower_python, spec, tmp / "spec.json")
        if args.compressed_set:
            results["skyfed_compressed"] = run_skyfed(args.preset, overrides + args.compressed_set, tmp / "skyfed-compressed")
            results["skyfed_compressed"]["set"] = args.compressed_set

    s, f = results["skyfed"], results["flower"]
    ratios = {
        "wall_skyfed_over_flower": s["wall_s"] / f["wall_s"],
        "not_training_skyfed_over_flower": s["not_training_s"] / f["not_training_s"],
        "framework_overhead_skyfed_over_flower": s["framework_overhead_s"] / f["framework_overhead_s"],
        "final_ppl_skyfed_over_flower": s["final"]["val_ppl"] / f["final"]["val_ppl"],
        "bytes_up_flower_over_skyfed": f["bytes_up_per_client_round"] / s["bytes_up_per_client_round"],
    }
    if "skyfed_compressed" in results:
        c = results["skyfed_compressed"]
        flower_bytes = f["bytes_up_per_client_round"] + f["bytes_down_per_client_round"]
        ratios["bytes_flower_over_skyfed_compressed"] = flower_bytes / (c["bytes_up_per_client_round"] + c["bytes_down_per_client_round"])
        ratios["final_ppl_compressed_over_flower"] = c["final"]["val_ppl"] / f["final"]["val_ppl"]
    import torch

    flwr_version = subprocess.run([args.flower_python, "-c", "import flwr; print(flwr.__version__)"],
                                  capture_output=True, text=True).stdout.strip()
    result = {
        "benchmark": "vs_flower",
        "command": "PYTHONPATH=src python bench/vs_flower.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                    "flwr": flwr_version, "threads_per_side": args.threads,
                    "load_average_1_5_15": os.getloadavg()},  # near the side count when nothing else runs
        "order": "flower first" if args.flower_first else "skyfed first",
        "setup": {"model": cfg.model.preset, "params": sum(int(np.prod(t.shape)) for t in _param_shapes(cfg, data)),
                  "clients": len(data.client_tokens), "rounds": args.rounds, "local_steps": args.steps,
                  "batch_size": cfg.train.batch_size, "seq_len": cfg.train.seq_len, "optimizer_state": "reset",
                  "eval_max_batches": cfg.eval.max_batches, "final_eval_max_batches": cfg.eval.final_max_batches},
        **results,
        "ratios": ratios,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({"skyfed": {k: s[k] for k in ("wall_s", "train_s", "not_training_s", "framework_overhead_s")},
                      "flower": {k: f[k] for k in ("wall_s", "train_s", "not_training_s", "framework_overhead_s")},
                      "final_ppl": {"skyfed": s["final"]["val_ppl"], "flower": f["final"]["val_ppl"]},
                      "ratios": ratios}, indent=2))
    return result


def _param_shapes(cfg, data):
    from skyfed.model import federated_parameter_names, get_params
    from skyfed.runtime.setup import new_model

    model = new_model(cfg, data.tokenizer)
    return list(get_params(model, federated_parameter_names(model)).values())


if __name__ == "__main__":
    main()
