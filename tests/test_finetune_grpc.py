"""LoRA over gRPC: real server and client processes exchange only the adapter, and the
deployment's adapter equals a simulation's."""

from __future__ import annotations

import json

from finetune_fixtures import pretrained  # noqa: F401  (a fixture)
from grpc_harness import SMOKE, client_args, free_port, metrics, server_args
from safetensors.torch import load_file

from skyfed.config import load_config
from skyfed.runtime.simulation import run_simulation

CLIENTS = ["aws", "gcp", "azure"]


def test_lora_deployment_sends_only_the_adapter_and_matches_simulation(procs, pretrained, tmp_path):
    lora = [f"model.path={pretrained / 'model'}", "model.peft.method=lora", "model.peft.r=8", "train.lr=0.01"]
    cfg = [*SMOKE, *[x for item in lora for x in ("--set", item)]]
    port = free_port()
    run = tmp_path / "run"
    procs.start("server", server_args(cfg, port, None, run))
    for name in CLIENTS:
        procs.start(name, client_args(name, port, None))
    assert procs.wait_exit("server", 600) == 0, procs.logs()
    for name in CLIENTS:
        assert procs.wait_exit(name, 60) == 0, procs.logs()
    deployed = load_file(run / "adapter" / "adapter_model.safetensors")
    fp32 = sum(4 * t.numel() for t in deployed.values())
    rows = metrics(run)
    assert [r["round"] for r in rows] == [0, 1]
    for row in rows:
        assert all(fp32 <= b <= 1.02 * fp32 for b in row["bytes_up_by_client"].values()), row
    summary = json.loads((run / "summary.json").read_text())
    assert summary["total"]["bytes_up"] == sum(r["bytes_up"] for r in rows) <= 2 * 3 * 1.02 * fp32

    sim_run, _ = run_simulation(load_config(None, "smoke", ["threads=1", *lora]), tmp_path / "sim")
    simulated = load_file(sim_run.path / "adapter" / "adapter_model.safetensors")
    assert deployed.keys() == simulated.keys()
    for name, t in simulated.items():
        assert (deployed[name] - t).abs().max().item() <= 1e-5, name
