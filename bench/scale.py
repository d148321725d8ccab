"""Memory and framework overhead of the Ray runtime against the number of clients.

    python bench/scale.py                            # 10, 100, 1000 clients x 1, 2 actors
    python bench/scale.py --clients 10 100 --actors 1 --rounds 2
    python bench/scale.py --plot-only                # redraw docs/results/scale.png

One local Ray (2 CPUs, 200 MB object store) serves every case; each case runs in its own
driver process that joins it (`ray.address: auto`), so the driver's peak RSS is its own.
Each case: gpt2-tiny, `federation.num_clients` N (natural partition of WikiText-2),
10% of the clients sampled per round, few local steps, client state on disk
(`ray.client_state: disk`). Measured per case:

- peak RSS: the driver's `ru_maxrss` plus each actor's (`ClientReplica.peak_rss_bytes`),
  a bound on what the run held at once; Ray's own processes (GCS, raylet) are listed
  apart, as sampled at the end of the case;
- framework overhead per sampled client and round: the round's wall time minus the
  evaluation and minus the clients' training time spread over the actors
  (sum of compute_s / actors), divided by the clients sampled. Round 0 (warm-up) is
  left out.

Goals (issue 15): 1,000 clients at 10% sampling within 4 GB, overhead <= 20 ms per
sampled client per round. The load average is recorded: on a shared machine both
numbers grow with it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

OUT = Path("bench/results/scale.json")
PLOT = Path("docs/results/scale.png")


def case_overrides(clients: int | str, actors: int | str, rounds: int, steps: int) -> list[str]:
    return [
        "model.preset=gpt2-tiny", "threads=1", f"federation.num_clients={clients}", "federation.fraction=0.1",
        f"federation.rounds={rounds}", f"train.local_steps={steps}", "train.batch_size=4", "train.seq_len=64",
        "train.warmup_steps=0", "eval.max_batches=2", "eval.final_max_batches=2", "data.partition.method=natural",
        "runtime=ray", "ray.address=auto", f"ray.actors={actors}", "ray.client_state=disk",
        "clouds.aggregation_s=0.0",
    ]


def run_case(clients: int, actors: int, rounds: int, steps: int) -> dict:
    """One case, in this process (the child): run, then measure."""
    import ray
    import torch

    from skyfed.config import load_config
    from skyfed.runtime.assemble import assemble, finish
    from skyfed.runtime.ray import ray_transport

    torch.set_num_threads(1)
    cfg = load_config(overrides=case_overrides(clients, actors, rounds, steps))
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        run = assemble(cfg, ray_transport(out), out)
        try:
            run.engine.run()
            actor_rss = ray.get([a.peak_rss_bytes.remote() for a in run.transport._actors])
        finally:
            run.transport.close()
        finish(run, {})
        rows = run.run_dir.read_metrics()
    driver_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    per_round = []
    for r in rows:
        sampled = len(r["compute_s"])
        train = sum(r["compute_s"].values())
        overhead = r["wall_time_s"] - r["eval_s"] - train / actors
        per_round.append({
            "round": r["round"], "sampled": sampled, "wall_s": r["wall_time_s"], "eval_s": r["eval_s"],
            "compute_s_sum": train, "overhead_s": overhead, "overhead_ms_per_client": 1000 * overhead / max(1, sampled),
        })
    measured = per_round[1:] or per_round
    return {
        "clients": clients, "actors": actors, "rounds": per_round,
        "overhead_ms_per_client": statistics.median(r["overhead_ms_per_client"] for r in measured),
        "driver_peak_rss_mb": driver_rss / 2**20, "actor_peak_rss_mb": [x / 2**20 for x in actor_rss],
        "peak_rss_mb": (driver_rss + sum(actor_rss)) / 2**20,
    }


def ray_system_rss_mb() -> dict[str, float]:
    import psutil

    out: dict[str, float] = {}
    for p in psutil.process_iter(["name", "cmdline", "memory_info"]):
        cmd = " ".join(p.info["cmdline"] or [])
        for tag in ("gcs_server", "raylet", "dashboard", "log_monitor", "monitor.py"):
            if tag in cmd and p.info["memory_info"] is not None:
                out[tag] = out.get(tag, 0.0) + p.info["memory_info"].rss / 2**20
    return out


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (mem, over) = plt.subplots(1, 2, figsize=(10, 4))
    for actors in sorted({c["actors"] for c in result["cases"]}):
        cases = sorted((c for c in result["cases"] if c["actors"] == actors), key=lambda c: c["clients"])
        xs = [c["clients"] for c in cases]
        mem.plot(xs, [c["peak_rss_mb"] / 1024 for c in cases], marker="o", label=f"{actors} actor(s)")
        over.plot(xs, [c["overhead_ms_per_client"] for c in cases], marker="o", label=f"{actors} actor(s)")
    mem.axhline(4, color="grey", linestyle="--", label="goal 4 GB")
    over.axhline(20, color="grey", linestyle="--", label="goal 20 ms")
    for ax, label in ((mem, "peak RSS, driver + actors (GB)"), (over, "overhead per sampled client (ms)")):
        ax.set_xscale("log")
        ax.set_xlabel("logical clients (10% sampled per round)")
        ax.set_ylabel(label)
        ax.legend()
    load = result["load_average"]
    fig.suptitle(f"Ray runtime, gpt2-tiny, {result['cpus']} CPUs, load average {load[0]:.1f} at the start")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> dict | None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, nargs="+", default=[10, 100, 1000])
    ap.add_argument("--actors", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--plot", type=Path, default=PLOT)
    ap.add_argument("--plot-only", action="store_true")
    ap.add_argument("--case", type=int, nargs=2, help=argparse.SUPPRESS)  # CLIENTS ACTORS, in a child
    args = ap.parse_args(argv)
    if args.case is not None:
        print(json.dumps(run_case(*args.case, args.rounds, args.steps)))
        return None
    if args.plot_only:
        plot(json.loads(args.out.read_text()), args.plot)
        return None
    import ray

    load = os.getloadavg()
    ray.init(num_cpus=2, object_store_memory=200 * 2**20, include_dashboard=False)
    cases = []
    try:
        for clients in args.clients:
            for actors in args.actors:
                started = time.perf_counter()
                cmd = [sys.executable, __file__, "--case", str(clients), str(actors),
                       "--rounds", str(args.rounds), "--steps", str(args.steps)]
                done = subprocess.run(cmd, capture_output=True, text=True, timeout=3600, check=False)
                if done.returncode != 0:
                    raise SystemExit(f"case {clients} clients x {actors} actors failed:\n{done.stderr[-3000:]}")
                case = json.loads(done.stdout.strip().splitlines()[-1])
                case["case_wall_s"] = time.perf_counter() - started
                case["load_average_after"] = os.getloadavg()
                cases.append(case)
                print(f"{clients} clients x {actors} actors: peak RSS {case['peak_rss_mb']:.0f} MB, "
                      f"overhead {case['overhead_ms_per_client']:.1f} ms/client", flush=True)
        system = ray_system_rss_mb()
    finally:
        ray.shutdown()
    result = {
        "benchmark": "scale",
        "command": "python bench/scale.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "cpus": os.cpu_count(), "load_average": load, "ray_cpus": 2, "object_store_mb": 200,
        "setup": case_overrides("N", "A", args.rounds, args.steps),  # each case's config overrides
        "ray_system_rss_mb": system,
        "goals": {"peak_rss_gb": 4, "overhead_ms_per_client": 20},
        "cases": cases,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    plot(result, args.plot)
    return result


if __name__ == "__main__":
    main()
