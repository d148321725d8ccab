"""Communication compression benchmark: bytes vs final perplexity, and codec throughput.

    PYTHONPATH=src python bench/compression.py --skip-throughput --only fp32 int8 lowrank6to22_int4_rim
    PYTHONPATH=src python bench/compression.py --skip-throughput --only lowrank6to22_int4_rim_seed1
    PYTHONPATH=src python bench/compression.py --skip-runs          # part (b) alone, on an idle machine

(a) Runs issue 17's setting (the default three clouds, gpt2-tiny, WikiText-2, FedAvg,
Dirichlet alpha 0.1, 10 rounds x 40 local steps, one thread, final evaluation on 40
batches) once per named codec configuration (`RUNS`), with the fp32 row of the same
seed, and records total bytes (up, down, both), the final validation perplexity, the
curve, and their ratios to that fp32 row. Each row is added to the results file as it
finishes, under a file lock, so invocations side by side fill one file; each row keeps
the command that reproduces it, and the file's top-level `command` writes it again whole.
An invocation with other settings than the file's is refused (use `--out`).

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
import os
import platform
import re
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from paired_runs import locked  # noqa: E402

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
RUNS["up16_down15_int4_block512_rim"] = {"uplink": [LOWRANK(16), {"name": "int4", "block": 512}],
                                         "downlink": [LOWRANK(15), {"name": "int4", "block": 512}], "residual_in_model": True}
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


SEED_SUFFIX = re.compile(r"^(?P<base>.+)_seed(?P<seed>\d+)$")


def row_spec(name: str) -> tuple[dict[str, Any], int]:
    """The compression config and seed of a row: a name of RUNS, optionally ending in
    `_seedN` (that config with seed N; the default is seed 0)."""
    m = SEED_SUFFIX.match(name)
    base, seed = (m["base"], int(m["seed"])) if m else (name, 0)
    if base not in RUNS:
        raise ValueError(f"unknown configuration {name!r}; known: {', '.join(RUNS)} (each optionally + _seedN)")
    return RUNS[base], seed


def fp32_of(seed: int) -> str:
    return "fp32" if seed == 0 else f"fp32_seed{seed}"


def settings_of(args: argparse.Namespace) -> dict[str, Any]:
    return {"rounds": args.rounds, "local_steps": args.steps, "threads": args.threads,
            "final_max_batches": args.final_batches, "set": args.set}


def settings_flags(settings: dict[str, Any]) -> list[str]:
    flags = ["--rounds", str(settings["rounds"]), "--steps", str(settings["local_steps"]),
             "--threads", str(settings["threads"]), "--final-batches", str(settings["final_max_batches"])]
    return flags + [a for s in settings["set"] for a in ("--set", s)]


def run_row(name: str, settings: dict[str, Any]) -> dict[str, Any]:
    """One run of the experiment with row `name`'s codecs: bytes, final perplexity, curve."""
    from skyfed.config import load_config
    from skyfed.runtime.simulation import run_simulation

    compression, seed = row_spec(name)
    overrides = [f"federation.rounds={settings['rounds']}", f"train.local_steps={settings['local_steps']}",
                 f"threads={settings['threads']}", f"eval.final_max_batches={settings['final_max_batches'] or 'null'}",
                 f"compression={json.dumps(compression)}", f"seed={seed}", *settings["set"]]
    cfg = load_config(None, "default", overrides)
    load_start = os.getloadavg()
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        _, summary = run_simulation(cfg, Path(tmp) / name)
        lines = (Path(tmp) / name / "metrics.jsonl").read_text().splitlines()
    tot = summary["total"]
    return {
        "compression": compression, "seed": seed, "val_ppl": summary["final"]["val_ppl"],
        "bytes_up": tot["bytes_up"], "bytes_down": tot["bytes_down"], "bytes": tot["bytes"],
        "compression_ratio_up": tot.get("compression_ratio_up"), "compression_ratio_down": tot.get("compression_ratio_down"),
        "val_ppl_by_round": [m["val_ppl"] for m in map(json.loads, lines) if "val_ppl" in m],
        "wall_s": time.perf_counter() - t0, "load_start": list(load_start), "load_end": list(os.getloadavg()),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": "PYTHONPATH=src python bench/compression.py " + shlex.join(
            ["--skip-throughput", *settings_flags(settings), "--only", name]),
    }


def annotate(results: dict[str, Any]) -> None:
    """Ratios of every row to the fp32 row of its seed, and the top-level command: the
    invocations that write the file again (the runs, then the throughput part)."""
    rows = results.get("runs", {})
    for row in rows.values():
        base = rows.get(fp32_of(row.get("seed", 0)))
        for key, ratio in (("ppl_vs_fp32", "val_ppl"), ("bytes_vs_fp32", "bytes"), ("bytes_up_vs_fp32", "bytes_up")):
            row[key] = row[ratio] / base[ratio] if base else None
    commands = []
    if rows:
        commands.append("PYTHONPATH=src python bench/compression.py " + shlex.join(
            ["--skip-throughput", *settings_flags(results["settings"]), "--only", *rows]))
    if "throughput" in results:
        commands.append(results["throughput"]["command"])
    results["command"] = " && ".join(commands)


def update(out: Path, change) -> dict[str, Any]:
    """Read `out` under its lock, apply `change` (a function of the results dict), annotate
    and write it: invocations side by side add their rows one at a time."""
    with locked(out):
        results = json.loads(out.read_text()) if out.exists() else {"benchmark": "compression"}
        change(results)
        annotate(results)
        out.write_text(json.dumps(results, indent=1) + "\n")
        return results


def planned_rows(args: argparse.Namespace, out: Path) -> list[str]:
    """The rows to run, each after the fp32 row of its seed; ValueError for an unknown name
    or a results file with other settings."""
    settings = settings_of(args)
    existing = json.loads(out.read_text()) if out.exists() else {}
    if existing.get("settings", settings) != settings:
        raise ValueError(f"{out} holds runs with settings {existing['settings']}, not {settings}; "
                         "write to another file with --out")
    names = list(dict.fromkeys(args.only or DEFAULT_RUNS))
    seeds = [row_spec(n)[1] for n in names]
    return list(dict.fromkeys([*(fp32_of(s) for s in seeds), *names]))


def run_experiments(args: argparse.Namespace, out: Path, names: list[str]) -> None:
    settings = settings_of(args)
    existing = json.loads(out.read_text()) if out.exists() else {}
    for name in names:
        if name in existing.get("runs", {}) and not args.rerun:
            continue
        row = run_row(name, settings)

        def add_row(results: dict[str, Any], name: str = name, row: dict[str, Any] = row) -> None:
            results.setdefault("settings", settings)
            results["runs"] = {**results.get("runs", {}), name: row}

        rows = update(out, add_row)["runs"]
        r = rows[name]
        vs = f"({r['ppl_vs_fp32']:.3f}x)  bytes {r['bytes']:12d} ({r['bytes_vs_fp32']:.4f}x)" if r["ppl_vs_fp32"] else ""
        print(f"{name:24s} ppl {r['val_ppl']:8.2f} {vs}  {r['wall_s']:.0f}s", flush=True)


def run_throughput(args: argparse.Namespace, out: Path) -> None:
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

    part: dict[str, Any] = {"fp32_input_gb": gb, "threads": 1, "repeats": args.repeats, "codecs": {},
                            "machine": f"{platform.processor() or platform.machine()}, torch {torch.__version__}",
                            "load_start": list(os.getloadavg())}
    plain = best(lambda: st_load(st_save(tensors)))
    part["safetensors_gbps"] = gb / plain
    print(f"safetensors save+load: {gb / plain:.2f} GB/s", flush=True)
    for name, specs in CODECS.items():
        chain = Chain.from_specs(specs)
        nbytes = len(encode_payload(tensors, chain))
        secs = best(lambda: decode_payload(encode_payload(tensors, chain), spec))
        enc = best(lambda: encode_payload(tensors, chain))
        part["codecs"][name] = {"chain": specs, "bytes": nbytes, "bytes_vs_fp32": nbytes / (gb * 1e9),
                                "encode_decode_gbps": gb / secs, "encode_gbps": gb / enc,
                                "vs_safetensors": plain / secs}
        print(f"{name:16s} {gb / secs:6.2f} GB/s ({plain / secs:.2f}x safetensors), encode {gb / enc:.2f} GB/s, "
              f"{nbytes / (gb * 1e9):.4f} of fp32 bytes", flush=True)
    part["load_end"] = list(os.getloadavg())
    part["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    part["command"] = "PYTHONPATH=src python bench/compression.py " + shlex.join(
        ["--skip-runs", "--numel", str(args.numel), "--repeats", str(args.repeats)])
    update(out, lambda results: results.__setitem__("throughput", part))


ISSUE_SETTING = ["data.partition.method=dirichlet", "data.partition.alpha=0.1"]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="bench/results/compression.json")
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--steps", type=int, default=40, help="local steps per round")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--final-batches", type=int, default=40, help="eval.final_max_batches (0 = the whole split)")
    p.add_argument("--set", action="append", default=None,
                   help=f"config override passed through (default: {' '.join(ISSUE_SETTING)})")
    p.add_argument("--only", nargs="*", help=f"rows to run (with the fp32 row of their seed): {', '.join(RUNS)}; "
                                             "a name + _seedN runs that config with seed N")
    p.add_argument("--rerun", action="store_true", help="run rows the file already holds again")
    p.add_argument("--numel", type=int, default=100_000_000, help="values in the throughput update")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--skip-runs", action="store_true")
    p.add_argument("--skip-throughput", action="store_true")
    args = p.parse_args(argv)
    args.set = ISSUE_SETTING if args.set is None else args.set
    logging.basicConfig(level=logging.WARNING)
    out = Path(args.out)
    try:
        names = [] if args.skip_runs else planned_rows(args, out)  # checked before anything runs
    except ValueError as exc:
        p.error(str(exc))
    if not args.skip_throughput:
        run_throughput(args, out)
    if not args.skip_runs:
        run_experiments(args, out, names)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
