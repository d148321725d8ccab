"""The CLI's help, config validation (run, server, partition, calibrate) and the
model.path and data.path checks run without torch, transformers, gRPC or Ray (each CLI process the
suite spawns would otherwise spend seconds importing them). Checked in a fresh
interpreter: this one has torch already."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "transformers", "grpc", "ray", "safetensors", "numpy")

PROBE = r"""
import contextlib, io, json, sys

import skyfed.cli as cli
from skyfed.config import PRESETS, load_config

out = {"exits": {}, "runs": []}
commands = [[]] + [[c.name or c.callback.__name__] for c in cli.app.registered_commands]
for cmd in commands:
    with contextlib.redirect_stdout(io.StringIO()):
        try:
            cli.main([*cmd, "--help"])
        except SystemExit as exc:
            out["exits"][" ".join(cmd) or "-"] = exc.code
out["commands"] = len(commands)
for name in PRESETS:
    load_config(None, name, [])
cfg = load_config(None, "smoke", ["compression.uplink=[{name: topk, fraction: 0.1}, int8]", "compression.downlink=[bf16]"])
out["uplink"] = cfg.compression.uplink
err = io.StringIO()
with contextlib.redirect_stderr(err):
    for argv in (
        ["run", "--preset", "smoke", "--set", "compression.uplink=[nocodec]"],
        ["run", "--preset", "smoke", "--set", "model.path=" + sys.argv[1], "--out", sys.argv[2]],
        ["run", "--preset", "smoke", "--set", "data.path=" + sys.argv[1], "--out", sys.argv[2]],
        ["server", "--preset", "smoke", "--open", "--insecure", "--set", "federation.rounds=0"],
        ["partition", "--preset", "smoke", "--set", "federation.rounds=0"],
        ["calibrate", "--preset", "smoke", "--set", "federation.rounds=0"],
    ):
        try:
            cli.main(argv)
        except SystemExit as exc:
            out["runs"].append(exc.code)
out["stderr"] = err.getvalue()
out["loaded"] = [m for m in sys.argv[3].split(",") if m in sys.modules]
print(json.dumps(out))
"""


def test_help_config_errors_and_missing_model_or_data_paths_import_no_torch(tmp_path):
    missing, run_dir = tmp_path / "missing", tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "COLUMNS": "200"}
    res = subprocess.run(
        [sys.executable, "-c", PROBE, str(missing), str(run_dir), ",".join(HEAVY)],
        capture_output=True, text=True, env=env, timeout=120,
    )
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["loaded"] == []
    assert out["commands"] >= 12  # skyfed itself, run ... suite, server, client, certs
    assert len(out["exits"]) == out["commands"] and set(out["exits"].values()) == {0}  # every --help
    assert out["uplink"] == [
        {"name": "topk", "fraction": 0.1, "scope": "tensor", "exact_max": 1 << 20, "seed": 0},
        {"name": "int8", "block": 256, "stochastic": False, "seed": 0},
    ]
    assert out["runs"] == [2, 2, 2, 2, 2, 2]
    lines = [line for line in out["stderr"].splitlines() if line.strip()]
    assert lines[0].startswith("error: preset 'smoke' with --set: compression.uplink: unknown codec 'nocodec'")
    assert lines[1] == f"error: model.path: model directory not found: {missing}"
    assert lines[2] == f"error: data path not found: {missing}"
    rounds = "error: preset 'smoke' with --set: federation.rounds: Input should be greater than or equal to 1 (got 0)"
    assert lines[3:] == [rounds] * 3
    assert not run_dir.exists()
