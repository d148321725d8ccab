"""`skyfed suite`: a tiny manifest of smoke runs, resumed, reported; manifest errors."""

import json

import pytest
import yaml

from conftest import run_cli
from skyfed.errors import ConfigError
from skyfed.suite import load_suite, plan_suite

TINY = {
    "name": "tiny",
    "defaults": {"preset": "smoke", "seeds": 2, "set": ["federation.rounds=1", "train.local_steps=2", "eval.final_max_batches=2"]},
    "quick": {"preset": "smoke", "set": ["federation.rounds=1", "train.local_steps=1"]},
    "experiments": {
        "lr": {
            "title": "learning rate",
            "variants": {"lr-high": ["train.lr=0.004"], "lr-low": ["train.lr=0.0005"]},
            "baselines": ["sync"],
        },
        "sweep": {
            "title": "warmup sweep",
            "seeds": 1,
            "variants": {"fedavg": []},
            "sweep": {"key": "train.warmup_steps", "values": [0, 3], "label": "warmup", "log_scale": False},
        },
    },
}


def write_manifest(tmp_path, tree=TINY):
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(tree, sort_keys=False))
    return path


def test_plan_crosses_variants_baselines_sweeps_and_seeds(tmp_path):
    spec = load_suite(write_manifest(tmp_path))
    plan = plan_suite(spec, tmp_path / "out")
    assert [(r.experiment, r.label, r.seed) for r in plan] == [
        ("lr", "lr-high", 0), ("lr", "lr-high", 1), ("lr", "lr-low", 0), ("lr", "lr-low", 1),
        ("lr", "baseline-sync", 0), ("lr", "baseline-sync", 1),
        ("sweep", "fedavg warmup=0", 0), ("sweep", "fedavg warmup=3", 0),
    ]
    high = plan[1]
    assert high.overrides == ["federation.rounds=1", "train.local_steps=2", "eval.final_max_batches=2",
                              "train.lr=0.004", "seed=1", 'name="lr-high"']
    assert plan[7].overrides[-3] == "train.warmup_steps=3"
    assert plan[4].baseline == "sync" and plan[4].dir == tmp_path / "out" / "lr" / "runs" / "baseline-sync-s0"
    quick = plan_suite(spec, tmp_path / "out", quick=True)
    assert len(quick) == 5 and {r.seed for r in quick} == {0}  # one seed
    assert quick[0].overrides[-3] == "train.local_steps=1"  # quick.set comes after the variant


@pytest.mark.parametrize("tree, message", [
    ({"experiments": {}}, "at least one experiment"),
    ({"experiments": {"a": {"variants": {"x": ["train.lr=1"]}, "colour": 1}}}, "unknown key.*colour"),
    ({"experiments": {"a": {"baselines": ["ring"]}}}, "unknown baseline 'ring'"),
    ({"experiments": {"a": {"variants": {"x": "train.lr=1"}}}}, "variants.x: expected a list"),
])
def test_bad_manifests_are_one_clear_error(tmp_path, tree, message):
    with pytest.raises(ConfigError, match=message):
        load_suite(write_manifest(tmp_path, tree))


def test_suite_runs_resumes_and_reports_through_the_cli(tmp_path):
    manifest = write_manifest(tmp_path)
    out = tmp_path / "out"
    proc = run_cli("suite", str(manifest), "--out", str(out), "--only", "lr", "--seeds", "2", "--quiet")
    assert proc.returncode == 0, proc.stderr
    runs = sorted(p.name for p in (out / "lr" / "runs").iterdir())
    assert runs == ["baseline-sync-s0", "baseline-sync-s1", "lr-high-s0", "lr-high-s1", "lr-low-s0", "lr-low-s1"]
    cfg = yaml.safe_load((out / "lr" / "runs" / "lr-low-s1" / "config.yaml").read_text())
    assert (cfg["name"], cfg["seed"], cfg["train"]["lr"], cfg["federation"]["rounds"]) == ("lr-low", 1, 0.0005, 1)
    report = json.loads((out / "lr" / "report.json").read_text())
    groups = {g["label"]: g for g in report["groups"]}
    assert set(groups) == {"lr-high", "lr-low", "baseline-sync"}
    ppls = [json.loads((out / "lr" / "runs" / f"lr-high-s{s}" / "summary.json").read_text())["final"]["val_ppl"] for s in (0, 1)]
    assert groups["lr-high"]["val_ppl"]["mean"] == pytest.approx(sum(ppls) / 2)
    assert groups["lr-high"]["val_ppl"]["n"] == 2 and groups["lr-high"]["val_ppl"]["std"] > 0
    assert (out / "lr" / "ppl_vs_round.png").exists()

    # a crashed run (no summary.json) is redone; finished ones are skipped, untouched
    finished = out / "lr" / "runs" / "lr-high-s0" / "summary.json"
    before = finished.stat().st_mtime_ns
    (out / "lr" / "runs" / "lr-low-s1" / "summary.json").unlink()
    proc = run_cli("suite", str(manifest), "--out", str(out), "--only", "lr", "--seeds", "2", "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert finished.stat().st_mtime_ns == before
    redone = out / "lr" / "runs" / "lr-low-s1"
    assert (redone / "summary.json").exists()
    assert len((redone / "metrics.jsonl").read_text().splitlines()) == 1  # started again, not appended


def test_sweep_experiment_gets_its_plot(tmp_path):
    manifest = write_manifest(tmp_path)
    out = tmp_path / "out"
    proc = run_cli("suite", str(manifest), "--out", str(out), "--only", "sweep", "--quick", "--quiet")
    assert proc.returncode == 0, proc.stderr
    md = (out / "sweep" / "report.md").read_text()
    assert "](sweep_ppl.png)" in md and (out / "sweep" / "sweep_ppl.png").read_bytes()[:4] == b"\x89PNG"
    assert "fedavg warmup=0" in md and "fedavg warmup=3" in md
    index = json.loads((out / "suite.json").read_text())
    assert index["quick"] is True and len(index["experiments"]["sweep"]["runs"]) == 2


def test_a_bad_override_stops_the_suite_before_any_run(tmp_path):
    tree = {"experiments": {"a": {"preset": "smoke", "variants": {"ok": [], "bad": ["train.colour=3"]}}}}
    out = tmp_path / "out"
    proc = run_cli("suite", str(write_manifest(tmp_path, tree)), "--out", str(out))
    assert proc.returncode == 2
    assert "experiment a, run 'bad'" in proc.stderr and "train.colour: unknown key" in proc.stderr
    assert not (out / "a" / "runs").exists()
