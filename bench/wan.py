"""Benchmark: a real WAN run against the simulator's cloud model (issue 16, item 6).

A `skyfed server` and three `skyfed client` processes (TLS, tokens), each in its own
network namespace; every client's link is rate-limited with `tc tbf` both ways and delayed
by a user-space relay (the kernel has no netem): tests/wan_lab.py. Then:

1. the same config through the simulator's model: `CloudNetwork.download_s/upload_s` for
   the real bytes of every transfer, with the compute time the clients measured
   (`tests/wan_analysis.py`), and `skyfed run` of the same config with each cloud's
   `tokens_per_s` set to its client's measured mean, for its simulated clock;
2. the measured round time against both (ratios measured / simulated), and each link's
   measured download and upload against the model's;
3. the bytes counted on the links (relay at the server's end, veth) against the egress
   ledger (the ledger of the WAN run's transfers, and the `skyfed run` summary.json).

    sudo PYTHONPATH=src python bench/wan.py                     # writes bench/results/wan.json
    python bench/wan.py --report bench/results/wan.json         # the markdown for docs/deployment.md

Needs root, `ip` and `tc`; everything it built is torn down on every path (SIGTERM too).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the lab, shared with tests/test_wan_netns.py

from wan_analysis import compare  # noqa: E402
from wan_federation import run_wan  # noqa: E402
from wan_lab import Link, skip_reason  # noqa: E402

LINKS = "aws:200:200:20,gcp:100:100:40,azure:20:20:80"


def parse_links(text: str) -> list[Link]:
    """NAME:UP_MBPS:DOWN_MBPS:RTT_MS, comma-separated."""
    out = []
    for item in text.split(","):
        name, up, down, rtt = item.split(":")
        out.append(Link(name, float(up), float(down), float(rtt)))
    return out


def simulate(run: dict, folder: Path) -> dict:
    """`skyfed run` of the WAN run's config, each cloud computing at its client's measured
    mean throughput: the simulated clock and the egress ledger of summary.json."""
    from skyfed.config import load_config

    cfg = load_config(run["config"], "smoke")
    tokens = cfg.train.local_steps * cfg.train.batch_size * cfg.train.seq_len
    sets = []
    tps = {}
    for link in run["links"]:
        c = link["name"]
        mean_compute = sum(m["compute_s"][c] for m in run["metrics"]) / len(run["metrics"])
        tps[c] = tokens / mean_compute
        sets += ["--set", f"clouds.profiles.{c}.tokens_per_s={tps[c]}"]
    out = folder / "sim"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.setdefault("SKYFED_CACHE", str(folder / "cache"))
    subprocess.run([sys.executable, "-m", "skyfed", "run", run["config"], "--preset", "smoke", *sets, "--out", str(out), "-q"],
                   check=True, env=env, capture_output=True, timeout=1800)
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    summary = json.loads((out / "summary.json").read_text())
    return {"tokens_per_task": tokens, "tokens_per_s": tps, "summary_egress_bytes": summary["egress_bytes"],
            "sim_time_s": summary["sim_time_s"],
            "rounds": [{"round_sim_s": m["round_sim_s"], "slowest_client": m["slowest_client"], "client_timing": m["client_timing"],
                        "bytes_up_by_client": m["bytes_up_by_client"], "bytes_down_by_client": m["bytes_down_by_client"]} for m in lines]}


def against_simulation(run: dict, cmp: dict, sim: dict) -> dict:
    """Measured rounds against the simulated clock; relay bytes against summary.json's ledger."""
    measured = [r["measured_s"] for r in cmp["rounds"]]
    simulated = [r["round_sim_s"] for r in sim["rounds"]]
    ledger = sim["summary_egress_bytes"]
    per_cloud = {c: {"ledger": ledger[c], "relay": row["up"]["relay"], "relay_over_ledger": row["up"]["relay"] / ledger[c]}
                 for c, row in cmp["bytes"]["clients"].items()}
    server = cmp["bytes"]["server_cloud"]
    down = cmp["bytes"]["server_down"]["relay"]
    per_cloud[server] = {"ledger": ledger[server], "relay": down, "relay_over_ledger": down / ledger[server]}
    return {"round_measured_s": measured, "round_sim_s": simulated,
            "round_ratio_mean": sum(m / s for m, s in zip(measured, simulated)) / len(measured), "bytes": per_cloud}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--links", default=LINKS, help=f"NAME:UP_MBPS:DOWN_MBPS:RTT_MS,... (default {LINKS})")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--model", default="gpt2-tiny", help="model preset (on the smoke preset)")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "wan.json"))
    p.add_argument("--workdir", help="keep the run here (default: a temporary folder, removed)")
    p.add_argument("--no-sim", action="store_true", help="skip the `skyfed run` simulation")
    p.add_argument("--report", metavar="JSON", help="print the markdown of a results file and exit")
    args = p.parse_args(argv)
    if args.report:
        print(report(json.loads(Path(args.report).read_text())))
        return 0
    reason = skip_reason()
    if reason:
        print(f"error: {reason}", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwind: the lab's teardown runs
    load_start = list(os.getloadavg())
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="skyfed-wan-") as tmp:
        folder = Path(args.workdir or tmp)
        run = run_wan(folder, parse_links(args.links), args.rounds, args.model)
        cmp = compare(run)
        sim = None if args.no_sim else simulate(run, folder)
    result = {
        "command": " ".join(["PYTHONPATH=src python bench/wan.py", *(argv if argv is not None else sys.argv[1:])]),
        "load_average_start": load_start,
        "load_average_end": list(os.getloadavg()),
        "cpu_count": os.cpu_count(),
        "kernel": platform.release(),
        "wall_s": time.time() - started,
        "model": args.model,
        "rounds": args.rounds,
        "links": run["links"],
        "tbf_burst_bytes": run["tbf_burst_bytes"],
        "metrics": [{k: m[k] for k in ("round", "wall_time_s", "eval_s", "aggregate_s", "compute_s", "bytes_up_by_client", "bytes_down_by_client")}
                    for m in run["metrics"]],
        "veth": run["veth"],
        "model_comparison": cmp,
        "simulation": None if sim is None else {**sim, **against_simulation(run, cmp, sim)},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(report(result))
    return 0


def report(r: dict) -> str:
    """The tables of docs/deployment.md, from a results JSON."""
    cmp, sim = r["model_comparison"], r["simulation"]
    links = ", ".join(f"{x['name']} {x['up_mbps']:g}/{x['down_mbps']:g} Mbit/s {x['rtt_ms']:g} ms" for x in r["links"])
    lines = [f"Links (up/down, RTT): {links}; model {r['model']}, {r['rounds']} rounds; "
             f"load average {r['load_average_start'][0]:.1f} at the start, {r['load_average_end'][0]:.1f} at the end, {r['cpu_count']} cores.", "",
             "| round | measured (server wall - eval) | model (measured compute) | ratio | `skyfed run` round_sim_s | ratio | slowest client's measured total | server rest |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for i, row in enumerate(cmp["rounds"]):
        s = sim["rounds"][i]["round_sim_s"] if sim else None
        rest = f"{row['slowest_measured']} {row['slowest_total_s']:.3f} s | {row['server_rest_s']:.3f} s |" if "server_rest_s" in row else "- | - |"
        lines.append(f"| {row['round']} | {row['measured_s']:.3f} s | {row['model_s']:.3f} s | **{row['ratio']:.3f}** | "
                     + (f"{s:.3f} s | **{row['measured_s'] / s:.3f}** | " if s else "- | - | ") + rest)
    mean = f"mean over the rounds of measured / model **{cmp['round_ratio_mean']:.3f}**"
    if sim:
        mean += f", measured / simulated clock **{sim['round_ratio_mean']:.3f}**"
    lines += ["", f"Round time: {mean}."]
    lines += ["", "| link | download measured / model | upload measured / model | (download + upload) ratio |", "| --- | --- | --- | --- |"]
    for c, row in cmp["clients"].items():
        if row["measured"] is None:
            lines.append(f"| {c} | not segmented | | |")
            continue
        d = ", ".join(f"{a['download_s']:.3f}/{b['download_s']:.3f}" for a, b in zip(row["measured"], row["model"]))
        u = ", ".join(f"{a['upload_s']:.3f}/{b['upload_s']:.3f}" for a, b in zip(row["measured"], row["model"]))
        lines.append(f"| {c} | {d} s | {u} s | **{row['comm_ratio']:.3f}** |")
    lines += ["", "| bytes | ledger (payload) | relay at the server's end | relay / ledger | in the transfers / ledger | session bytes | veth (L2) / ledger |",
              "| --- | --- | --- | --- | --- | --- | --- |"]
    for c, row in cmp["bytes"]["clients"].items():
        for d, label in (("up", f"{c} up (billed to {c})"), ("down", f"{c} down (billed to {cmp['bytes']['server_cloud']})")):
            x = row[d]
            lines.append(f"| {label} | {x['ledger']:,} | {x['relay']:,} | **{x['relay_over_ledger']:.4f}** | "
                         f"{x.get('in_transfers_over_ledger', float('nan')):.4f} | {x.get('session', 0):,} | {x['veth_over_ledger']:.4f} |")
    if sim:
        parts = ", ".join(f"{c} {v['relay_over_ledger']:.4f}" for c, v in sim["bytes"].items())
        lines += ["", f"Against `skyfed run`'s summary.json ledger (relay / ledger per cloud): {parts}."]
    lines += ["", f"Command: `{r['command']}` ({r['wall_s']:.0f} s)."]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
