"""Every strategy end to end on the `smoke` preset: it converges. FedAvg runs through the
real CLI; the others through the Python API (`skyfed.run`, the same run in this process:
a CLI process spends most of a smoke run importing torch and transformers)."""

import json
import math

import pytest
from conftest import run_cli

import skyfed
from skyfed.federation.strategies import STRATEGIES

VOCAB = 512  # the smoke preset's tokenizer: an untrained model's loss is about ln(512) = 6.24
ROUNDS = 3


def skyfed_cli(*args):
    return run_cli(*args, timeout=600)


def run_smoke(out, name, rounds, steps, *extra):
    """The smoke preset with `name`, `rounds` x `steps` and the overrides in `extra`:
    through the CLI for FedAvg, else through `skyfed.run`."""
    sets = ["threads=1", f"federation.rounds={rounds}", f"train.local_steps={steps}", "eval.max_batches=2",
            f"federation.strategy.name={name}", *extra]
    if name == "fedavg":
        proc = skyfed_cli("run", "--preset", "smoke", "-q", "--out", str(out), *[a for s in sets for a in ("--set", s)])
        assert proc.returncode == 0, proc.stderr[-2000:]
    else:
        skyfed.run(preset="smoke", overrides=sets, out=out)


# FedSGD takes one server step per round (clients send gradients), so it gets more,
# shorter rounds: 20 rounds x 2 gradient batches is fewer client batches than 3 x 20.
# FedAvgM's default (momentum 0.9, lr 0.1) equals FedAvg's step only once momentum has
# built up, after ~10 rounds; three rounds check it with momentum 0.5 (lr 0.5).
CASES = [(name, [], (20, 2) if name == "fedsgd" else (ROUNDS, 20)) for name in STRATEGIES if name != "fedavgm"] + [
    ("fedavgm", ["federation.strategy.params={momentum: 0.5}"], (ROUNDS, 20)),
    ("dynamic", ["federation.strategy.params={score: server, server_tokens: 1024}"], (ROUNDS, 20)),
    ("fedopt", ["federation.strategy.params={optimizer: nesterov, lr: 0.5, momentum: 0.5}"], (ROUNDS, 20)),
]


@pytest.mark.parametrize("name,extra,shape", CASES, ids=[f"{n}{'-' + str(i) if e else ''}" for i, (n, e, _) in enumerate(CASES)])
def test_strategy_converges_on_smoke(tmp_path, name, extra, shape):
    rounds, steps = shape
    run_smoke(tmp_path / "run", name, rounds, steps, *extra)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    rows = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert summary["strategy"] == name and len(rows) == rounds
    assert summary["final"]["val_loss"] < math.log(VOCAB) - 0.45, summary["final"]
    assert rows[-1]["val_loss"] < rows[0]["val_loss"]
    if name == "dynamic":
        assert set(rows[0]["weights"]) == {"aws", "gcp", "azure"}
        assert sum(rows[0]["weights"].values()) == pytest.approx(1.0)
        assert all(v is not None for v in rows[0]["scores"].values())
    if STRATEGIES[name].asynchronous:
        assert rows[-1]["updates"] == 3 * rounds and "staleness" in rows[-1]


def test_cli_lists_strategies(monkeypatch):
    monkeypatch.setenv("COLUMNS", "250")  # a wide table: no wrapped names or arXiv ids
    proc = skyfed_cli("strategies")
    assert proc.returncode == 0, proc.stderr
    for name, cls in STRATEGIES.items():
        assert name in proc.stdout
        assert cls.paper.split("arXiv:")[-1] in proc.stdout


@pytest.mark.parametrize("sets,message", [
    (["federation.strategy.name=fedopt", "federation.strategy.params.lr=-1"], "federation.strategy.params.lr: must be > 0"),
    (["federation.strategy.name=fedbuff", "federation.strategy.params.K=3"], "federation.strategy.params.K: unknown parameter"),
    (["federation.strategy.name=fedsomething"], "federation.strategy.name: unknown strategy 'fedsomething'"),
])
def test_bad_strategy_config_is_one_line_and_exit_2(tmp_path, sets, message):
    args = ["run", "--preset", "smoke", "-q", "--out", str(tmp_path / "bad")]
    for s in sets:
        args += ["--set", s]
    proc = skyfed_cli(*args)
    assert proc.returncode == 2
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "bad").exists()  # refused before any work
