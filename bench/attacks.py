"""Byzantine robustness: one of five clouds attacks, each attack in turn, against each defence.

    # the issue's setting (gpt2-tiny, 10 rounds; about 60 runs of ~2 min CPU each):
    PYTHONPATH=src nice -n 10 python bench/attacks.py --train-tokens 300000 --valid-tokens 32768 --out bench/results/attacks-gpt2tiny.json
    # the small setting in docs/security.md (smoke preset: gpt2-micro, 3 rounds; seconds per run):
    PYTHONPATH=src nice -n 10 python bench/attacks.py --preset smoke --rounds 3
    PYTHONPATH=src python bench/attacks.py --table [--out FILE]       # Markdown tables from a result JSON

Setting (recorded in the JSON under "config"): a preset (default: the model gpt2-tiny on
WikiText-2), five clients (aws, gcp, azure, onprem and aws-eu on the aws profile; IID
partition), `--rounds` rounds (10) of `--steps` local steps (10), data cut to
`--train-tokens`, gcp the attacker. Attacks
(`attack:` section, simulation only; factors in "attacks"): sign_flip, scale, noise,
alie, junk_data, and no attack. Defences: fedavg, median, trimmed_mean, krum, multikrum,
centered_clip, fedavg + norm_bound, loss_filter. The norm bound C is 1.5 x the median
norm of the honest updates of the clean FedAvg run (which runs through the norm-bound
wrapper with an infinite bound: the same arithmetic as FedAvg, plus the norms in its
metrics).
Asynchronous rows: fedasync and fedbuff under the scale attack, plain, with
max_staleness and max_client_share, and with norm_bound too; and the same with the
attacker's cloud much faster than the others (a flood: speed 8, 2 ms, 10 Gbit/s).

Each row: final validation perplexity (the whole, cut validation split) and its ratio
to clean FedAvg's. The issue's goal: for every attack the best robust strategy within
5% of clean FedAvg (ratio <= 1.05), with plain FedAvg visibly broken.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "attacks.json"

ATTACKS = {"none": None, "sign_flip": 4.0, "scale": 100.0, "noise": 10.0, "alie": None, "junk_data": None}
DEFENCES = ["fedavg", "median", "trimmed_mean", "krum", "multikrum", "centered_clip", "fedavg+norm_bound", "loss_filter"]
ATTACKER = "gcp"
CLIENTS = "[{name: aws}, {name: gcp}, {name: azure}, {name: onprem}, {name: aws-eu, cloud: aws}]"
ASYNC = {
    "fedasync": {"alpha": 0.6},
    "fedbuff": {"buffer_size": 5},
}
ASYNC_GUARD = {"max_staleness": 4, "max_client_share": 0.3, "share_window": 10}
# the attacker's cloud made 8x faster with a 2 ms, 10 Gbit/s link: it finishes tasks far more often (a flood)
FAST = f"clouds.profiles={{{ATTACKER}: {{speed: 8.0, rtt_ms: 2, uplink_mbps: 10000, downlink_mbps: 10000}}}}"


# asynchronous variants: (attack, guards, norm bound on, attacker fast)
ASYNC_VARIANTS = {
    "clean": ("none", {}, False, False),
    "scale": ("scale", {}, False, False),
    "scale+guards": ("scale", ASYNC_GUARD, False, False),
    "scale+guards+norm_bound": ("scale", ASYNC_GUARD, True, False),
    "fast_scale": ("scale", {}, False, True),
    "fast_scale+guards": ("scale", ASYNC_GUARD, False, True),
    "fast_scale+guards+norm_bound": ("scale", ASYNC_GUARD, True, True),
}


def base_sets(args) -> list[str]:
    sets = [
        "threads=1", f"federation.clients={CLIENTS}", f"federation.rounds={args.rounds}",
        f"train.local_steps={args.steps}", "train.warmup_steps=5", "eval.max_batches=4", "seed=0",
    ]
    if args.train_tokens is not None:
        sets.append(f"data.max_train_tokens={args.train_tokens}")
    if args.valid_tokens is not None:
        sets.append(f"data.max_valid_tokens={args.valid_tokens}")
    return sets


def strategy_sets(defence: str, norm_bound: float | None) -> list[str]:
    if defence == "fedavg+norm_bound":
        return ["federation.strategy.name=fedavg", f"federation.strategy.norm_bound={norm_bound}"]
    if defence == "loss_filter":
        return ["federation.strategy.name=loss_filter", "federation.strategy.params={server_tokens: 4096}"]
    return [f"federation.strategy.name={defence}"]


def attack_sets(attack: str) -> list[str]:
    if attack == "none":
        return []
    factor = ATTACKS[attack]
    return [f"attack={{clients: [{ATTACKER}], kind: {attack}" + (f", factor: {factor}" if factor is not None else "") + "}"]


def run_one(preset: str, sets: list[str]) -> dict[str, Any]:
    from skyfed.config import load_config
    from skyfed.runtime.simulation import run_simulation

    cfg = load_config(None, preset, sets)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        run, summary = run_simulation(cfg, Path(tmp) / "run")
        rows = run.read_metrics()
    return {"sets": sets, "summary": summary, "rows": rows, "wall_s": time.perf_counter() - started}


def row_record(label: dict[str, Any], out: dict[str, Any]) -> dict[str, Any]:
    rows = out["rows"]
    rec = {
        **label,
        "val_ppl": out["summary"]["final"]["val_ppl"],
        "val_loss": out["summary"]["final"]["val_loss"],
        "ppl_curve": [r["val_ppl"] for r in rows],
        "wall_s": round(out["wall_s"], 1),
        "sets": out["sets"],
    }
    krum = [r["robust"]["selected"] for r in rows if "selected" in r.get("robust", {})]
    if krum:
        rec["attacker_selected_rounds"] = sum(ATTACKER in s for s in krum)
    dropped = [r["loss_filter"]["dropped"] for r in rows if "loss_filter" in r]
    if dropped:
        rec["attacker_dropped_rounds"] = sum(ATTACKER in d for d in dropped)
        rec["honest_dropped"] = sum(len([c for c in d if c != ATTACKER]) for d in dropped)
    clipped = [r["norm_bound"]["clipped"] for r in rows if "norm_bound" in r]
    if clipped:
        rec["attacker_clipped_rounds"] = sum(ATTACKER in c for c in clipped)
        rec["honest_clipped"] = sum(len([c for c in d if c != ATTACKER]) for d in clipped)
    if rows and rows[-1].get("mode") == "async":
        rec["dropped_stale"] = sum(len(r.get("dropped", {})) for r in rows)
        rec["share_dropped"] = sum(sum(m.get("share_dropped", {}).values()) for r in rows for m in r.get("strategy_metrics", []))
        rec["attacker_arrivals"] = sum(a == ATTACKER for r in rows for a in r["arrivals"])
        rec["arrivals"] = sum(len(r["arrivals"]) for r in rows)
    return rec


def honest_norms(out: dict[str, Any]) -> list[float]:
    return [n for r in out["rows"] for c, n in r.get("norm_bound", {}).get("norms", {}).items() if c != ATTACKER]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--preset", default="default", help="experiment preset (default: gpt2-tiny; smoke: gpt2-micro)")
    ap.add_argument("--train-tokens", type=int, default=None, help="data.max_train_tokens (default: the preset's)")
    ap.add_argument("--valid-tokens", type=int, default=None, help="data.max_valid_tokens (default: the preset's)")
    ap.add_argument("--only", default=",".join(DEFENCES), help="comma-separated defences")
    ap.add_argument("--attacks", default=",".join(ATTACKS), help="comma-separated attacks (none = no attack)")
    ap.add_argument("--no-async", action="store_true")
    ap.add_argument("--under-attack", default=None,
                    help="comma-separated defences for the attacked columns (default: --only; the no-attack column always uses --only)")
    ap.add_argument("--async-only", default=",".join(ASYNC), help="comma-separated asynchronous strategies")
    ap.add_argument("--async-variants", default=",".join(ASYNC_VARIANTS), help="comma-separated: " + ", ".join(ASYNC_VARIANTS))
    ap.add_argument("--resume", action="store_true",
                    help="reuse the rows of an unfinished --out file written with the same config (same rows are not run again)")
    ap.add_argument("--merge", type=Path, nargs="+", default=None,
                    help="merge these result files (parts of one matrix, each with its own clean FedAvg row, which must agree) into --out")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--table", action="store_true", help="print the Markdown tables of --out and exit")
    args = ap.parse_args(argv)
    if args.table:
        print(table(json.loads(args.out.read_text())))
        return {}
    if args.merge:
        result = merge([json.loads(f.read_text()) for f in args.merge], argv)
        args.out.write_text(json.dumps(result, indent=1))
        print(table(result))
        return result
    logging.basicConfig(level=logging.ERROR)
    torch.set_num_threads(1)
    defences = [d for d in args.only.split(",") if d]
    attacks = [a for a in args.attacks.split(",") if a]
    load_start = os.getloadavg()
    started = time.perf_counter()
    base = base_sets(args)
    rows: list[dict[str, Any]] = []

    bound: dict[str, Any] = {"C": None, "norms": []}

    done: dict[str, dict[str, Any]] = {}
    if args.resume and args.out.exists():
        old = json.loads(args.out.read_text())
        if old["config"]["sets"] == base and old["config"]["preset"] == args.preset:
            done = {json.dumps(r["sets"]): r for r in old["rows"]}
            print(f"resuming: {len(done)} rows of {args.out} are reused", flush=True)

    def record(label: dict[str, Any], sets: list[str]) -> dict[str, Any]:
        again = done.get(json.dumps(base + sets))
        if again is not None:
            rows.append(again)
            return {"reused": True}
        out = run_one(args.preset, base + sets)
        rec = row_record(label, out)
        rows.append(rec)
        print(json.dumps({k: rec[k] for k in ("defence", "attack", "val_ppl", "wall_s") if k in rec}), flush=True)
        if bound["C"] is not None:  # a stopped run leaves the rows it finished
            save(args, argv, rows, load_start, started, base, attacks, bound["C"], bound["norms"], complete=False)
        return out

    # clean FedAvg first: the reference, and (through an infinite norm bound) the honest update norms
    clean = record({"defence": "fedavg", "attack": "none"}, ["federation.strategy.name=fedavg", "federation.strategy.norm_bound=1e30"])
    if clean.get("reused"):  # the bound of the run resumed
        norm_bound = old["norm_bound"]["C"]
        nb = old["norm_bound"]
        norms = nb.get("honest_norms") or [nb["honest_norms_median"]] * 2 + [nb["honest_norms_max"]]
    else:
        norms = honest_norms(clean)
        norm_bound = round(1.5 * statistics.median(norms), 4)
    bound.update(C=norm_bound, norms=norms)
    save(args, argv, rows, load_start, started, base, attacks, norm_bound, norms, complete=False)  # the clean row, for --resume
    attacked = [d for d in (args.under_attack or args.only).split(",") if d]
    for attack in attacks:
        for defence in defences if attack == "none" else attacked:
            if (defence, attack) == ("fedavg", "none"):
                continue
            record({"defence": defence, "attack": attack}, strategy_sets(defence, norm_bound) + attack_sets(attack))
    if not args.no_async:
        chosen = [v for v in args.async_variants.split(",") if v]
        for name in [a for a in args.async_only.split(",") if a]:
            params = ASYNC[name]
            variants = [ASYNC_VARIANTS[v] for v in chosen]
            for attack, guard, with_bound, fast in variants:
                nb = norm_bound if with_bound else None
                extra = [FAST] if fast else []
                p = {**params, **guard}
                sets = [f"federation.strategy.name={name}", f"federation.strategy.params={json.dumps(p)}", *extra]
                if nb is not None:
                    sets.append(f"federation.strategy.norm_bound={nb}")
                label = {"defence": name + ("+guards" if guard else "") + ("+norm_bound" if nb else ""), "attack": attack,
                         "mode": "async", "params": p, "attacker_fast": bool(extra)}
                record(label, sets + attack_sets(attack))
    result = save(args, argv, rows, load_start, started, base, attacks, norm_bound, norms, complete=True)
    print(table(result))
    return result


def save(args, argv, rows, load_start, started, base, attacks, norm_bound, norms, complete: bool) -> dict[str, Any]:
    """Write the result JSON (ratios to the first row, clean FedAvg); `complete` false while running."""
    ref = rows[0]["val_ppl"]
    for r in rows:
        r["ratio_to_clean_fedavg"] = r["val_ppl"] / ref
    result = {
        "command": "python bench/attacks.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "complete": complete,
        "loadavg_start": load_start,
        "loadavg_end": os.getloadavg(),
        "torch_threads": 1,
        "wall_s": round(time.perf_counter() - started, 1),
        "config": {"preset": args.preset, "sets": base, "attacker": ATTACKER},
        "attacks": {a: ATTACKS[a] for a in attacks},
        "norm_bound": {"C": norm_bound, "honest_norms_median": statistics.median(norms), "honest_norms_max": max(norms),
                       "honest_norms": norms,
                       "rule": "1.5 x the median norm of the honest updates of the clean FedAvg run"},
        "clean_fedavg_ppl": ref,
        "goal": goal(rows),
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    return result


def merge(parts: list[dict[str, Any]], argv: list[str] | None) -> dict[str, Any]:
    """One result from parts of a matrix run as separate processes: each part starts with its
    own clean FedAvg row (same config and seed), and those must agree to 1e-6 relative, or
    the parts are not one experiment. Rows keep the first part's order; duplicates of
    clean FedAvg are dropped."""
    first = parts[0]
    for p in parts[1:]:
        if p["config"] != first["config"]:
            raise SystemExit(f"merge: parts differ in config: {p['config']} vs {first['config']}")
        if abs(p["clean_fedavg_ppl"] - first["clean_fedavg_ppl"]) > 1e-6 * first["clean_fedavg_ppl"]:
            raise SystemExit(f"merge: clean FedAvg differs between parts: {p['clean_fedavg_ppl']} vs {first['clean_fedavg_ppl']}")
        if p["norm_bound"]["C"] != first["norm_bound"]["C"]:
            raise SystemExit("merge: the parts' norm bounds differ")
    rows = list(first["rows"])
    for p in parts[1:]:
        rows += [r for r in p["rows"][1:]]
    return {
        **first,
        "command": "python bench/attacks.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "parts": [{"command": p["command"], "complete": p.get("complete"), "wall_s": p["wall_s"],
                   "loadavg_start": p["loadavg_start"], "loadavg_end": p["loadavg_end"]} for p in parts],
        "complete": all(p.get("complete") for p in parts),
        "attacks": {k: v for p in parts for k, v in p["attacks"].items()},
        "goal": goal(rows),
        "rows": rows,
    }


def goal(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per attack: plain FedAvg's ratio, the best robust defence and its ratio (goal: <= 1.05)."""
    out = {}
    sync = [r for r in rows if r.get("mode") != "async"]
    for attack in dict.fromkeys(r["attack"] for r in sync):
        if attack == "none":
            continue
        these = [r for r in sync if r["attack"] == attack]
        robust = [r for r in these if r["defence"] != "fedavg"]
        fedavg = next((r for r in these if r["defence"] == "fedavg"), None)
        if not robust:
            continue
        best = min(robust, key=lambda r: r["val_ppl"])
        out[attack] = {
            "fedavg_ratio": fedavg["ratio_to_clean_fedavg"] if fedavg else None,
            "best": best["defence"],
            "best_ratio": best["ratio_to_clean_fedavg"],
            "within_5pct": best["ratio_to_clean_fedavg"] <= 1.05,
        }
    return out


def _cell(r: dict[str, Any] | None) -> str:
    if r is None:
        return "-"
    ppl = r["val_ppl"]
    text = f"{ppl:.4g}" if ppl < 1e6 else f"{ppl:.2e}"
    return f"{text} ({r['ratio_to_clean_fedavg']:.3f})" if ppl < 1e6 else f"{text} (broken)"


def table(result: dict[str, Any]) -> str:
    """Markdown: defences x attacks (final val_ppl and ratio to clean FedAvg), then async rows."""
    rows = result["rows"]
    sync = [r for r in rows if r.get("mode") != "async"]
    attacks = list(dict.fromkeys(r["attack"] for r in sync))
    attacks = ["none"] + [a for a in attacks if a != "none"]
    defences = list(dict.fromkeys(r["defence"] for r in sync))
    lines = [f"Final validation perplexity (ratio to clean FedAvg, {result['clean_fedavg_ppl']:.4g}); "
             f"attacker {result['config']['attacker']}, factors {result['attacks']}, norm bound C = {result['norm_bound']['C']}.", "",
             "| defence | " + " | ".join("no attack" if a == "none" else a for a in attacks) + " |",
             "|---|" + "---:|" * len(attacks)]
    for d in defences:
        cells = [_cell(next((r for r in sync if r["defence"] == d and r["attack"] == a), None)) for a in attacks]
        lines.append(f"| {d} | " + " | ".join(cells) + " |")
    g = result.get("goal", {})
    if g:
        lines += ["", "| attack | FedAvg ratio | best defence | its ratio | within 5% |", "|---|---:|---|---:|---|"]
        for a, v in g.items():
            fr = v["fedavg_ratio"]
            fr_text = "-" if fr is None else (f"{fr:.3f}" if fr < 1e4 else f"{fr:.2e}")
            lines.append(f"| {a} | {fr_text} | {v['best']} | {v['best_ratio']:.3f} | {'yes' if v['within_5pct'] else 'no'} |")
    asyn = [r for r in rows if r.get("mode") == "async"]
    if asyn:
        lines += ["", "| async strategy | attack | attacker fast | attacker's arrivals | dropped (stale / share) | val_ppl (ratio) |",
                  "|---|---|---|---:|---:|---:|"]
        for r in asyn:
            lines.append(f"| {r['defence']} | {r['attack']} | {'yes' if r['attacker_fast'] else 'no'} | "
                         f"{r['attacker_arrivals']} of {r['arrivals']} | {r['dropped_stale']} / {r['share_dropped']} | {_cell(r)} |")
    lines += ["", f"Command: `{result['command']}` (load average {result['loadavg_start'][0]:.1f} at the start)."]
    for part in result.get("parts", []):
        lines.append(f"- part: `{part['command']}` (load average {part['loadavg_start'][0]:.1f} at the start, {part['wall_s']:.0f} s)")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
