"""bench/compression.py's bookkeeping: row names, the rows an invocation runs, the ratios
to the fp32 row of the same seed, and a results file with other settings refused."""

import argparse
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import compression  # noqa: E402


def args(**kw) -> argparse.Namespace:
    base = {"rounds": 10, "steps": 40, "threads": 1, "final_batches": 40, "set": compression.ISSUE_SETTING, "only": None}
    return argparse.Namespace(**{**base, **kw})


def test_row_names_carry_an_optional_seed():
    assert compression.row_spec("int8") == (compression.RUNS["int8"], 0)
    assert compression.row_spec("lowrank6to22_int4_rim_seed12") == (compression.RUNS["lowrank6to22_int4_rim"], 12)
    with pytest.raises(ValueError, match="unknown configuration 'int9_seed1'"):
        compression.row_spec("int9_seed1")


def test_each_row_runs_after_the_fp32_row_of_its_seed(tmp_path):
    out = tmp_path / "c.json"
    assert compression.planned_rows(args(only=["int8_seed1", "int4", "int8_seed1"]), out) == ["fp32_seed1", "fp32", "int8_seed1", "int4"]
    out.write_text(json.dumps({"settings": compression.settings_of(args()), "runs": {}}))
    assert compression.planned_rows(args(only=["fp32"]), out) == ["fp32"]
    with pytest.raises(ValueError, match="holds runs with settings .* write to another file with --out"):
        compression.planned_rows(args(rounds=6, only=["fp32"]), out)


def test_ratios_are_to_the_fp32_row_of_the_same_seed_and_the_command_rewrites_the_file():
    results = {"settings": compression.settings_of(args()), "runs": {
        "fp32": {"seed": 0, "val_ppl": 100.0, "bytes": 1000, "bytes_up": 500},
        "fp32_seed1": {"seed": 1, "val_ppl": 80.0, "bytes": 1000, "bytes_up": 500},
        "int8_seed1": {"seed": 1, "val_ppl": 84.0, "bytes": 250, "bytes_up": 125},
        "int4_seed2": {"seed": 2, "val_ppl": 90.0, "bytes": 130, "bytes_up": 65},
    }, "throughput": {"command": "PYTHONPATH=src python bench/compression.py --skip-runs --numel 100 --repeats 2"}}
    compression.annotate(results)
    row = results["runs"]["int8_seed1"]
    assert (row["ppl_vs_fp32"], row["bytes_vs_fp32"], row["bytes_up_vs_fp32"]) == (84.0 / 80.0, 0.25, 0.25)
    assert results["runs"]["int4_seed2"]["ppl_vs_fp32"] is None  # no fp32 row of seed 2
    runs_cmd, throughput_cmd = results["command"].split(" && ")
    assert runs_cmd.endswith("--only fp32 fp32_seed1 int8_seed1 int4_seed2")
    assert "--rounds 10 --steps 40 --threads 1 --final-batches 40 --set data.partition.method=dirichlet" in runs_cmd
    assert throughput_cmd == results["throughput"]["command"]
