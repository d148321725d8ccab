"""The markdown tables of issue 17's frontier runs, from bench/results/frontier.json
(written by bench/frontier.py): one row per current config, baseline and overrides,
both seeds.

- The bytes table: "MB to fedavg-fp32's ppl" is the communication a run needed to reach
  fedavg-fp32's final perplexity (same seed): the bytes so far at the first evaluated
  round at or below it (the paper's "GB" reading), for runs that recorded their curve.
- The slow-cloud table (goal 4; configs/frontier/slow-cloud.yaml and the runs compared
  with it): "simulated s to FedAvg's ppl" is the simulated clock at the first evaluated
  round whose perplexity is at or below the last evaluated round of slow-cloud.yaml's
  FedAvg (same seed, the same evaluation batches), and its ratio to FedAvg's whole run.

    python bench/frontier_table.py                 # prints the tables docs/results.md holds
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from frontier import REFERENCE, model_sets, reference  # noqa: E402

SLOW = "configs/frontier/slow-cloud.yaml"  # goal 4's FedAvg, with azure 4x slower
SLOW_SETTING = {SLOW, "configs/frontier/async.yaml"}  # the runs timed against it


def label(run: dict) -> str:
    name = Path(run["config"]).stem
    sets = model_sets(run["sets"])
    return " ".join([name, *([f"--baseline {run['baseline']}"] if run["baseline"] else []), *(f"--set {s}" for s in sets)])


def bytes_to_reach(run: dict, runs: list[dict]) -> float | None:
    """Bytes sent until `run` first evaluated at or below fedavg-fp32's final ppl (same seed)."""
    ref = reference(runs, REFERENCE, run["seed"])
    if ref is None or "curve" not in run:
        return None
    return next((point[1] for point in run["curve"] if point[2] <= ref["val_ppl"]), None)


def sim_end(run: dict) -> float | None:
    """The simulated clock at `run`'s last evaluated round (None: no curve, or one recorded without the clock)."""
    last = (run.get("curve") or [[]])[-1]
    return last[3] if len(last) > 3 else None


def slow_reference(run: dict, runs: list[dict]) -> dict | None:
    """slow-cloud.yaml's FedAvg run of `run`'s seed (current, no overrides), if it has a timed curve."""
    ref = reference(runs, SLOW, run["seed"])
    return ref if ref is not None and sim_end(ref) is not None else None


def time_to_reach(run: dict, runs: list[dict]) -> float | None:
    """Simulated seconds until `run` first evaluated at or below slow-cloud FedAvg's last evaluated ppl."""
    ref = slow_reference(run, runs)
    if ref is None or sim_end(run) is None:
        return None
    target = ref["curve"][-1][2]
    return next((point[3] for point in run["curve"] if point[2] <= target), None)


def grouped(runs: list[dict], slow: bool) -> dict[str, list[dict]]:
    """Current runs by row label, in the file's order of first appearance, seeds in order:
    those of the slow-cloud setting, or all others."""
    rows: dict[str, list[dict]] = {}
    for run in runs:
        if run.get("current", True) and (run["config"] in SLOW_SETTING) == slow:
            rows.setdefault(label(run), []).append(run)
    for seeds in rows.values():
        seeds.sort(key=lambda r: r["seed"])
    return rows


def joined(values: list, fmt: str) -> str:
    return " / ".join("-" if v is None else format(v, fmt) for v in values)


def table(runs: list[dict]) -> str:
    """The bytes table; each cell lists seed 0, then seed 1."""
    rows = grouped(runs, slow=False)
    lines = [
        "| run | seeds | val ppl | ppl / fedavg-fp32 | ppl / sync | total MB (up + down) | fewer bytes than fedavg-fp32 "
        "| MB to fedavg-fp32's ppl |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, seeds in rows.items():

        def cells(key: str, fmt: str) -> str:
            values = [r.get(key) for r in seeds]
            return " / ".join("-" if v is None else format(v, fmt) for v in values)

        mb = " / ".join(f"{r['bytes'] / 1e6:.2f}" for r in seeds)
        reach = [bytes_to_reach(r, runs) for r in seeds]
        to_target = " / ".join("-" if b is None else f"{b / 1e6:.2f}" for b in reach)
        lines.append(
            f"| {name} | {', '.join(str(r['seed']) for r in seeds)} | {cells('val_ppl', '.2f')} "
            f"| {cells('ppl_vs_fedavg_fp32', '.3f')} | {cells('ppl_vs_sync', '.3f')} | {mb} "
            f"| {cells('fewer_bytes_than_fedavg_fp32', '.3g')} | {to_target} |"
        )
    return "\n".join(lines)


def time_table(runs: list[dict]) -> str:
    """The slow-cloud table (goal 4); each cell lists seed 0, then seed 1."""
    lines = [
        "| run | seeds | val ppl | ppl / slow-cloud FedAvg | simulated s | simulated s to FedAvg's ppl "
        "| that / FedAvg's simulated s |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, seeds in grouped(runs, slow=True).items():
        refs = [slow_reference(r, runs) for r in seeds]
        reach = [time_to_reach(r, runs) for r in seeds]
        lines.append(
            f"| {name} | {', '.join(str(r['seed']) for r in seeds)} | {joined([r['val_ppl'] for r in seeds], '.2f')} "
            f"| {joined([r['val_ppl'] / f['val_ppl'] if f else None for r, f in zip(seeds, refs)], '.3f')} "
            f"| {joined([sim_end(r) for r in seeds], '.2f')} | {joined(reach, '.2f')} "
            f"| {joined([t / sim_end(f) if t is not None and f else None for t, f in zip(reach, refs)], '.3f')} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", type=Path, default=ROOT / "bench" / "results" / "frontier.json")
    args = ap.parse_args()
    runs = json.loads(args.results.read_text())["runs"]
    print(table(runs))
    if any(r["config"] in SLOW_SETTING for r in runs):
        print()
        print(time_table(runs))


if __name__ == "__main__":
    main()
