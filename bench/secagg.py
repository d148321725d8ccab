"""The cost of secure aggregation per round: bytes and wall time, against plain fp32.

    python bench/secagg.py                                 # n = 3, 5, 10; 16- and 32-bit ring
    python bench/secagg.py --clients 3 --out /tmp/secagg.json

For the default experiment's model (gpt2-tiny, vocab 4096) it runs the whole protocol
in one process (skyfed.security.secagg.simulated.secure_mean: real X25519, HKDF,
ChaCha20 masks, Shamir shares, AES-GCM) over random updates of the model's shape, with
no dropout and with one client dropped after set-up, and records:

- bytes per client per round, up (keys, shares, masked vector, unmasking shares) and
  down (roster, share bundle, unmask request), against the plain fp32 update that skyfed
  sends today (the wire container of the same tensors);
- protocol CPU seconds per client (the slowest) and at the server;
- the wall time of a plain round's critical path, measured here as one client's local
  training at the default settings (train.local_steps steps of batch 16 x 128 tokens,
  timed over --train-steps steps and scaled), and the ratio
  (local training + client protocol + server protocol) / local training, which is the
  round's slowdown when clouds train in parallel (issue 13's goal: <= 1.5x).

torch and numpy use one thread. Results go to bench/results/secagg.json.
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from skyfed.compression.wire import pack, spec_of
from skyfed.config import load_config
from skyfed.federation.messages import Update
from skyfed.model import build_model, federated_parameter_names, get_params
from skyfed.security.secagg.encoding import SecAggSettings
from skyfed.security.secagg.simulated import secure_mean


def local_training_s(cfg, model: torch.nn.Module, steps: int) -> float:
    """Seconds for cfg.train.local_steps AdamW steps, timed over `steps` (after one warm-up)."""
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr)
    batch = torch.randint(0, cfg.tokenizer.vocab_size, (cfg.train.batch_size, cfg.train.seq_len))

    def step() -> None:
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - t0) / steps * cfg.train.local_steps


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, nargs="+", default=[3, 5, 10])
    ap.add_argument("--bits", type=int, nargs="+", default=[16, 32])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--train-steps", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path("bench/results/secagg.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    cfg = load_config()
    model = build_model(cfg.model.preset, cfg.tokenizer.vocab_size)
    names = federated_parameter_names(model)
    params = get_params(model, names)
    spec = spec_of(params)
    dim = sum(t.numel() for t in params.values())
    fp32_bytes = len(pack(params, {"codec": []}))
    train_s = local_training_s(cfg, model, args.train_steps)
    g = torch.Generator().manual_seed(0)
    rows = []
    for n in args.clients:
        updates = [Update(f"c{i}", 0, 0, {k: torch.randn(v.shape, generator=g) * 0.01 for k, v in params.items()},
                          num_tokens=cfg.train.local_steps * cfg.train.batch_size * cfg.train.seq_len, train_loss=3.0)
                   for i in range(n)]
        names_n = [u.client for u in updates]
        for bits in args.bits:
            settings = SecAggSettings(ring_bits=bits, bound=0.1)
            for dropped in (0, 1):
                arrived = updates[: n - dropped]
                walls, clients_s, servers_s = [], [], []
                for _ in range(args.repeats):
                    t0 = time.perf_counter()
                    out = secure_mean(arrived, names_n, spec, settings, round=0)
                    walls.append(time.perf_counter() - t0)
                    clients_s.append(max(out.client_s.values()))
                    servers_s.append(out.server_s)
                client_s, server_s = statistics.median(clients_s), statistics.median(servers_s)
                up = max(out.bytes_up.values())
                down = max(out.bytes_down.values())
                row = {
                    "clients": n, "ring_bits": bits, "dropped": dropped, "params": dim,
                    "masked_vector_bytes": out.masked_bytes, "bytes_up_per_client": up, "bytes_down_per_client": down,
                    "protocol_overhead_up_bytes": up - out.masked_bytes, "fp32_update_bytes": fp32_bytes,
                    "up_vs_fp32": round(up / fp32_bytes, 4),
                    "client_protocol_s": round(client_s, 4), "server_protocol_s": round(server_s, 4),
                    "in_process_wall_s": round(statistics.median(walls), 4),
                    "round_slowdown_parallel_clients": round((train_s + client_s + server_s) / train_s, 4),
                }
                rows.append(row)
                print(f"n={n:2d} bits={bits} dropped={dropped}: up {up/1e6:.3f} MB/client ({row['up_vs_fp32']:.3f}x fp32), "
                      f"client {client_s:.3f}s, server {server_s:.3f}s, slowdown {row['round_slowdown_parallel_clients']:.4f}x")
    result = {
        "benchmark": "secagg",
        "command": shlex.join(["python", *sys.argv]),
        "load_average": os.getloadavg(),
        "machine": {"platform": platform.platform(), "torch": torch.__version__, "numpy": np.__version__, "threads": 1,
                    "cpus": os.cpu_count()},
        "model": cfg.model.preset, "params": dim, "fp32_update_bytes": fp32_bytes,
        "local_training_s": round(train_s, 3),
        "local_training_note": f"{cfg.train.local_steps} steps of batch {cfg.train.batch_size} x {cfg.train.seq_len}, "
                               f"timed over {args.train_steps} steps and scaled",
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    import json

    args.out.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
