"""docs/compression.md's tables, from bench/results/compression.json (bench/compression.py):
the rows each table lists, in order; a row the file does not hold is left out."""

from __future__ import annotations

from typing import Any

CLASSIC = ["fp32", "int8", "int4", "topk10", "topk10_noef", "topk1", "topk1_noef", "topk1_int8", "randk50_sign",
           "lowrank4_int8", "lowrank6_int8", "lowrank12_int4", "lowrank16_int4", "lowrank16_int4_noef", "lowrank32_int4",
           "lowrank32_sign", "lowrank48_sign", "up_lowrank16_int4", "down_lowrank16_int4"]
RESIDUAL_IN_MODEL = ["int8_rim", "int4_rim", "topk10_rim", "topk1_rim", "lowrank12_int4_rim", "lowrank16_int4_rim",
                     "lowrank16_int8_rim", "lowrank6to22_int4_rim", "up_lowrank16_int4_rim"]
SPLITS_AND_SCHEDULES = ["up12_down16_int4_rim", "up10_down18_int4_rim", "up16_down12_int4_rim", "up7_down21_int4_rim",
                        "lowrank10to20_int4_rim", "lowrank22to12_int4_rim", "lowrank10to18_int4_rim",
                        "lowrank2to28_int4_rim", "lowrank4to22_int4_rim", "up16_down15_int4_block512_rim"]
SEEDS = ["fp32_seed1", "lowrank6to22_int4_rim_seed1"]


def mb(n: int) -> str:
    return f"{n / 1e6:.2f} MB"


def runs_table(runs: dict[str, dict[str, Any]], names: list[str]) -> str:
    lines = ["| config | final ppl | ppl / fp32 | bytes up | bytes down | total bytes / fp32 | fewer bytes |",
             "|---|---|---|---|---|---|---|"]
    for name in (n for n in names if n in runs):
        r = runs[name]
        lines.append(f"| `{name}` | {r['val_ppl']:.2f} | {r['ppl_vs_fp32']:.3f} | {mb(r['bytes_up'])} | {mb(r['bytes_down'])} "
                     f"| {r['bytes_vs_fp32']:.2%} | {1 / r['bytes_vs_fp32']:.0f}x |")
    return "\n".join(lines) + "\n"


def throughput_table(part: dict[str, Any]) -> str:
    lines = [f"Plain safetensors save+load: **{part['safetensors_gbps']:.3f} GB/s** (load average "
             f"{part['load_start'][0]:.2f} at the start, {part['load_end'][0]:.2f} at the end)", "",
             "| codec chain | payload / fp32 | encode+decode GB/s | vs safetensors | encode only GB/s |",
             "|---|---|---|---|---|"]
    for name, c in part["codecs"].items():
        lines.append(f"| `{name}` | {c['bytes_vs_fp32']:.2%} | {c['encode_decode_gbps']:.3f} | {c['vs_safetensors']:.2f}x "
                     f"| {c['encode_gbps']:.3f} |")
    return "\n".join(lines) + "\n"


def not_measured(runs: dict[str, dict[str, Any]]) -> str:
    """The configurations of bench/compression.py's RUNS that the file holds no row of."""
    from compression import RUNS

    missing = [f"`{name}`" for name in RUNS if name not in runs]
    return (f"Not measured in this file ({len(missing)} of {len(RUNS)} configurations of `RUNS`; "
            f"`--only NAME` adds one): {', '.join(missing)}.\n") if missing else "Every configuration of `RUNS` is measured.\n"
