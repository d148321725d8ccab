"""Communication compression benchmark: bytes vs final perplexity, and codec throughput.

    PYTHONPATH=src python bench/compression.py                       # both parts (~15 min here)
    PYTHONPATH=src python bench/compression.py --rounds 10 --steps 40  # the full default experiment
    PYTHONPATH=src python bench/compression.py --set data.partition.method=natural --skip-throughput

(a) Runs the default three-cloud experiment (gpt2-tiny, WikiText-2, FedAvg) once per
codec configuration and reports total bytes (up, down, both), their ratio to the fp32
run of the same invocation, and the final validation perplexity and its ratio to fp32.
By default the run is reduced (``--rounds 6 --steps 10 --final-batches 40``, one thread)
so that the eight runs finish in about twenty minutes on a shared 2-core machine.

(b) Encode + decode throughput of each codec chain on a 100M-parameter fp32 update (four
5000x5000 tensors) on one CPU core, through the real wire path (`encode_payload` +
`decode_payload`, i.e. codec, safetensors container, CRC-32 and full validation), in GB/s
of fp32 input, beside plain `safetensors.torch.save` + `load` of the same tensors
measured in the same process.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

TOPK = lambda f: {"name": "topk", "fraction": f}  # noqa: E731
RANDK = lambda f: {"name": "randk", "fraction": f}  # noqa: E731
LOWRANK = lambda r: {"name": "lowrank", "rank": r}  # noqa: E731
SCHEDULE = lambda *ranks: {"name": "lowrank", "rank_by_round": list(ranks)}  # noqa: E731  (the last repeats)
RAMP = SCHEDULE(6, 8, 10, 12, 14, 16, 18, 20, 22)

RUNS: dict[str, dict[str, Any]] = {
    "fp32": {},
    "int8": {"uplink": ["int8"], "downlink": ["int8"]},
    "int4": {"uplink": ["int4"], "downlink": ["int4"]},
    "topk10": {"uplink": [TOPK(0.1)], "downlink": [TOPK(0.1)]},
    "topk10_noef": {"uplink": [TOPK(0.1)], "downlink": [TOPK(0.1)], "error_feedback": False},
    "topk1": {"uplink": [TOPK(0.01)], "downlink": [TOPK(0.01)]},
    "topk1_noef": {"uplink": [TOPK(0.01)], "downlink": [TOPK(0.01)], "error_feedback": False},
    "topk1_int8": {"uplink": [TOPK(0.01), "int8"], "downlink": [TOPK(0.01), "int8"]},
    # uplink-only sparsification (downlink int8), to separate the two directions' effects
    "up_topk10_down_int8": {"uplink": [TOPK(0.1)], "downlink": ["int8"]},
    "up_topk1_int8_down_int8": {"uplink": [TOPK(0.01), "int8"], "downlink": ["int8"]},
    "sign": {"uplink": ["sign"], "downlink": ["sign"]},
    "randk50_sign": {"uplink": [RANDK(0.5), "sign"], "downlink": [RANDK(0.5), "sign"]},
    "lowrank4_int8": {"uplink": [LOWRANK(4), "int8"], "downlink": [LOWRANK(4), "int8"]},
    "lowrank6_int8": {"uplink": [LOWRANK(6), "int8"], "downlink": [LOWRANK(6), "int8"]},
    "lowrank12_int4": {"uplink": [LOWRANK(12), "int4"], "downlink": [LOWRANK(12), "int4"]},
    "lowrank16_int4": {"uplink": [LOWRANK(16), "int4"], "downlink": [LOWRANK(16), "int4"]},
    "lowrank32_sign": {"uplink": [LOWRANK(32), "sign"], "downlink": [LOWRANK(32), "sign"]},
    "lowrank48_sign": {"uplink": [LOWRANK(48), "sign"], "downlink": [LOWRANK(48), "sign"]},
    # one direction only (the other plain fp32), to separate the two directions' costs
    "up_lowrank16_int4": {"uplink": [LOWRANK(16), "int4"], "downlink": []},
    "down_lowrank16_int4": {"uplink": [], "downlink": [LOWRANK(16), "int4"]},
    # a rising rank: low early (updates close to low rank), high late (flatter updates),
    # with the residual kept in the client's model
    "lowrank6to22_int4_rim": {"uplink": [RAMP, "int4"], "downlink": [RAMP, "int4"], "residual_in_model": True},
    # other schedules and splits tried on the way (docs/compression.md), all _rim
    **{f"lowrank{name}_int4_rim": {"uplink": [SCHEDULE(*ranks), "int4"], "downlink": [SCHEDULE(*ranks), "int4"], "residual_in_model": True}
       for name, ranks in {
        "10to20": (10, 10, 10, 10, 20), "10to18": (10, 10, 10, 10, 18), "22to12": (22, 22, 22, 22, 12),
        "2to28": (2, 4, 6, 8, 12, 16, 20, 24, 28), "4to22": (4, 6, 8, 10, 12, 14, 16, 18, 20, 22)}.items()},
    "lowrank32_int4": {"uplink": [LOWRANK(32), "int4"], "downlink": [LOWRANK(32), "int4"]},
    "lowrank16_int4_noef": {"uplink": [LOWRANK(16), "int4"], "downlink": [LOWRANK(16), "int4"], "error_feedback": False},
}
# the residual kept in the client's model (`residual_in_model`), for the codecs measured both ways
for _name in ("int8", "int4", "topk10", "topk1", "lowrank12_int4", "lowrank16_int4", "up_lowrank16_int4"):
    RUNS[f"{_name}_rim"] = {**RUNS[_name], "residual_in_model": True}
for _name, (_up, _down) in {"up12_down16": (12, 16), "up10_down18": (10, 18), "up16_down12": (16, 12), "up7_down21": (7, 21)}.items():
    RUNS[f"{_name}_int4_rim"] = {"uplink": [LOWRANK(_up), "int4"], "downlink": [LOWRANK(_down), "int4"], "residual_in_model": True}
RUNS["lowrank16_int8_rim"] = {"uplink": [LOWRANK(16), "int8"], "downlink": [LOWRANK(16), "int8"], "residual_in_model": True}
DEFAULT_RUNS = ["fp32", "int8", "int4", "topk10", "topk10_noef", "topk1", "topk1_noef", "topk1_int8", "lowrank12_int4", "lowrank16_int4"]

CODECS: dict[str, list[Any]] = {
    "fp32": [],
    "fp16": ["fp16"],
    "bf16": ["bf16"],
    "int8": ["int8"],
    "int8_stochastic": [{"name": "int8", "stochastic": True}],
    "int4": ["int4"],
    "topk10": [TOPK(0.1)],
    "topk1": [TOPK(0.01)],
    "topk1_int8": [TOPK(0.01), "int8"],
    "randk1": [{"name": "randk", "fraction": 0.01}],
    "sign": ["sign"],
    "randk50_sign": [RANDK(0.5), "sign"],
    "lowrank16_int4": [LOWRANK(16), "int4"],
}


def run_experiments(args: argparse.Namespace, results: dict[str, Any], save) -> None:
    from skyfed.config import load_config
    from skyfed.runtime.simulation import run_simulation

    names = args.only or DEFAULT_RUNS
    if "fp32" not in names:
        names = ["fp32", *names]
    rows = results.setdefault("runs", {})
    if args.merge:  # continue an earlier invocation with the same settings: reuse its rows
        rows.update(json.loads(Path(args.merge).read_text()).get("runs", {}))
    for name in names:
        if name in rows:
            continue
        overrides = [f"federation.rounds={args.rounds}", f"train.local_steps={args.steps}", f"threads={args.threads}",
                     f"eval.final_max_batches={args.final_batches or 'null'}",
                     f"compression={json.dumps(RUNS[name])}", *args.set]
        cfg = load_config(None, "default", overrides)
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            _, summary = run_simulation(cfg, Path(tmp) / name)
            lines = (Path(tmp) / name / "metrics.jsonl").read_text().splitlines()
        curve = [m["val_ppl"] for m in map(json.loads, lines) if "val_ppl" in m]
        tot = summary["total"]
        rows[name] = {
            "compression": RUNS[name], "val_ppl": summary["final"]["val_ppl"], "bytes_up": tot["bytes_up"],
            "bytes_down": tot["bytes_down"], "bytes": tot["bytes"], "compression_ratio_up": tot.get("compression_ratio_up"),
            "compression_ratio_down": tot.get("compression_ratio_down"), "wall_s": time.perf_counter() - t0,
            "val_ppl_by_round": curve,
        }
        base = rows["fp32"]
        for row in rows.values():
            row["ppl_vs_fp32"] = row["val_ppl"] / base["val_ppl"]
            row["bytes_vs_fp32"] = row["bytes"] / base["bytes"]
            row["bytes_up_vs_fp32"] = row["bytes_up"] / base["bytes_up"]
        print(f"{name:12s} ppl {rows[name]['val_ppl']:8.2f} ({rows[name]['ppl_vs_fp32']:.3f}x)  "
              f"bytes {rows[name]['bytes']:12d} ({rows[name]['bytes_vs_fp32']:.4f}x)  {rows[name]['wall_s']:.0f}s", flush=True)
        save()


def run_throughput(args: argparse.Namespace, results: dict[str, Any], save) -> None:
    from safetensors.torch import load as st_load
    from safetensors.torch import save as st_save

    from skyfed.compression.chain import Chain
    from skyfed.compression.payload import decode_payload, encode_payload
    from skyfed.compression.wire import spec_of

    torch.set_num_threads(1)
    side = int((args.numel / 4) ** 0.5)
    gen = torch.Generator().manual_seed(0)
    tensors = {f"layer{i}.weight": torch.randn(side, side, generator=gen) * 1e-3 for i in range(4)}
    spec = spec_of(tensors)
    gb = sum(t.numel() for t in tensors.values()) * 4 / 1e9

    def best(fn) -> float:
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return min(times)

    out = results.setdefault("throughput", {"fp32_input_gb": gb, "threads": 1, "codecs": {}})
    plain = best(lambda: st_load(st_save(tensors)))
    out["safetensors_gbps"] = gb / plain
    print(f"safetensors save+load: {gb / plain:.2f} GB/s", flush=True)
    for name, specs in CODECS.items():
        chain = Chain.from_specs(specs)
        nbytes = len(encode_payload(tensors, chain))
        secs = best(lambda: decode_payload(encode_payload(tensors, chain), spec))
        enc = best(lambda: encode_payload(tensors, chain))
        out["codecs"][name] = {"chain": specs, "bytes": nbytes, "bytes_vs_fp32": nbytes / (gb * 1e9),
                               "encode_decode_gbps": gb / secs, "encode_gbps": gb / enc,
                               "vs_safetensors": plain / secs}
        print(f"{name:16s} {gb / secs:6.2f} GB/s ({plain / secs:.2f}x safetensors), encode {gb / enc:.2f} GB/s, "
              f"{nbytes / (gb * 1e9):.4f} of fp32 bytes", flush=True)
        save()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="bench/results/compression.json")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--steps", type=int, default=10, help="local steps per round")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--final-batches", type=int, default=40, help="eval.final_max_batches (0 = the whole split)")
    p.add_argument("--set", action="append", default=[], help="config override passed through, e.g. data.partition.method=natural")
    p.add_argument("--only", nargs="*", help=f"run configurations (fp32 is always run): {', '.join(RUNS)}")
    p.add_argument("--merge", help="a results JSON of an earlier run with the same settings: reuse its rows (fp32 included)")
    p.add_argument("--numel", type=int, default=100_000_000, help="values in the throughput update")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--skip-runs", action="store_true")
    p.add_argument("--skip-throughput", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    results: dict[str, Any] = {
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads available, torch {torch.__version__}",
        "settings": {"rounds": args.rounds, "local_steps": args.steps, "threads": args.threads,
                     "final_max_batches": args.final_batches, "set": args.set},
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        out.write_text(json.dumps(results, indent=2))

    if not args.skip_throughput:
        run_throughput(args, results, save)
    if not args.skip_runs:
        run_experiments(args, results, save)
    save()
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
