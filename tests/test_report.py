"""`skyfed report`: tables and plots from hand-written run directories, and one real run."""

import json
import re

import pytest
import yaml

from conftest import run_cli
from skyfed.errors import DataError
from skyfed.report import group_runs, load_run, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def fake_run(root, dirname, name, seed, ppls, accs, bytes_per_round=0, sim_step=None, summary_extra=None, final=None):
    d = root / dirname
    d.mkdir(parents=True)
    (d / "config.yaml").write_text(yaml.safe_dump({"name": name, "seed": seed}))
    rows, up = [], 0
    for r, (p, a) in enumerate(zip(ppls, accs)):
        up += bytes_per_round
        row = {"round": r, "val_ppl": p, "val_token_acc": a, "bytes_up": bytes_per_round // 2,
               "bytes_down": bytes_per_round - bytes_per_round // 2}
        if sim_step is not None:
            row["sim_time_s"] = sim_step * (r + 1)
        rows.append(row)
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    fp, fa = final or (ppls[-1], accs[-1])
    summary = {"rounds": len(rows), "final": {"val_ppl": fp, "val_token_acc": fa},
               "total": {"bytes": bytes_per_round * len(rows)}, "wall_time_s": 10.0 + seed}
    summary.update(summary_extra or {})
    (d / "summary.json").write_text(json.dumps(summary))
    return d


def _table_row(md: str, label: str) -> list[str]:
    for line in md.splitlines():
        if line.startswith(f"| {label} |"):
            return [c.strip() for c in line.strip("|").split("|")]
    raise AssertionError(f"no row {label!r} in\n{md}")


def test_seeds_are_grouped_into_mean_and_std(tmp_path):
    runs = [
        fake_run(tmp_path, "a0", "fedavg", 0, [100, 50], [0.10, 0.20], 1_000_000, final=(40.0, 0.30)),
        fake_run(tmp_path, "a1", "fedavg", 1, [110, 60], [0.11, 0.21], 1_000_000, final=(50.0, 0.34)),
        fake_run(tmp_path, "b0", "int8", 0, [105, 55], [0.10, 0.19], 250_000, final=(45.0, 0.29)),
    ]
    report = write_report(runs, tmp_path / "rep")
    md = report.read_text()
    row = _table_row(md, "fedavg")
    # mean 45, sample std of (40, 50) = 7.07; accuracy 32.00 ± 2.83 (percent)
    assert row[1] == "2"
    assert row[2] == "32.00 ± 2.83"
    assert row[3] == "45.00 ± 7.07"
    assert row[4] == "0.002 ± 0"  # 2 rounds x 1 MB
    assert _table_row(md, "int8")[1:5] == ["1", "29.00", "45.00", "0.0005"]
    data = json.loads((tmp_path / "rep" / "report.json").read_text())
    g = {x["label"]: x for x in data["groups"]}
    assert g["fedavg"]["seeds"] == [0, 1]
    assert g["fedavg"]["val_ppl"]["mean"] == pytest.approx(45.0)
    assert g["fedavg"]["val_ppl"]["std"] == pytest.approx(7.0710678, rel=1e-6)
    assert g["fedavg"]["wall_time_s"]["mean"] == pytest.approx(10.5)


def test_pngs_are_valid_small_and_referenced(tmp_path):
    runs = [
        fake_run(tmp_path, "x", "fedavg", 0, [100, 60, 40], [0.1, 0.2, 0.3], 3_000_000, sim_step=12.5),
        fake_run(tmp_path, "y", "topk", 0, [100, 70, 45], [0.1, 0.18, 0.28], 30_000, sim_step=4.0),
    ]
    out = tmp_path / "rep"
    md = write_report(runs, out).read_text()
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == sorted(f"{m}_vs_{a}.png" for m in ("ppl", "acc") for a in ("round", "bytes", "simtime"))
    for name in pngs:
        data = (out / name).read_bytes()
        assert data[:8] == PNG_MAGIC
        assert 5_000 < len(data) < 200_000
        assert f"]({name})" in md
        # IHDR width and height: 6 x 4 inches at 100 dpi
        assert int.from_bytes(data[16:20], "big") == 600 and int.from_bytes(data[20:24], "big") == 400


def test_baseline_without_bytes_and_runs_without_sim_time(tmp_path):
    runs = [
        fake_run(tmp_path, "fed", "fedavg", 0, [100, 50], [0.1, 0.2], 1_000_000),
        fake_run(tmp_path, "base", "sync", 0, [90, 40], [0.12, 0.25], 0),
    ]
    out = tmp_path / "rep"
    md = write_report(runs, out).read_text()
    assert not list(out.glob("*_vs_simtime.png"))
    assert "no plot of validation perplexity vs simulated time" in md
    assert "left out (no bytes communicated): sync" in md
    assert (out / "ppl_vs_bytes.png").exists()
    assert "sim time (s)" not in md  # column left out: no run has it
    assert _table_row(md, "sync")[4] == "0"


def test_optional_summary_fields_fill_their_columns(tmp_path):
    extra = {"sim_time_s": 321.5, "egress_cost_usd": {"aws": 0.01, "total": 0.0275},
             "total": {"bytes": 2_000_000_000, "compression_ratio_up": 40.0, "compression_ratio_down": 4.0}}
    run = fake_run(tmp_path, "c", "comp", 3, [80, 40], [0.1, 0.3], 1000, summary_extra=extra)
    md = write_report([run], tmp_path / "rep").read_text()
    header = [c.strip() for c in md.split("## Final results")[1].strip().splitlines()[0].strip("|").split("|")]
    row = dict(zip(header, _table_row(md, "comp")))
    assert row["total GB"] == "2"
    assert row["sim time (s)"] == "321.5"
    assert row["egress (USD)"] == "0.0275"
    assert row["compression × up"] == "40.0" and row["compression × down"] == "4.0"


def test_labels_override_config_names_and_bad_input_is_one_clear_error(tmp_path):
    a = fake_run(tmp_path, "a", "same", 0, [10], [0.5], 10)
    b = fake_run(tmp_path, "b", "same", 1, [20], [0.4], 10)
    assert [g.label for g in group_runs([load_run(a), load_run(b)])] == ["same"]
    md = write_report([a, b], tmp_path / "rep", labels=["first", "second"]).read_text()
    assert _table_row(md, "first")[1] == "1" and _table_row(md, "second")[1] == "1"
    with pytest.raises(DataError, match="2 labels for 1 run"):
        write_report([a], tmp_path / "r2", labels=["x", "y"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"empty/summary.json: not found"):
        load_run(tmp_path / "empty")


def test_report_cli_on_a_real_smoke_run(tmp_path):
    run = tmp_path / "smoke"
    proc = run_cli("run", "--preset", "smoke", "--out", str(run), "--quiet")
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "rep"
    proc = run_cli("report", str(run), "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    md = (out / "report.md").read_text()
    summary = json.loads((run / "summary.json").read_text())
    row = _table_row(md, "smoke")
    assert row[3] == f"{summary['final']['val_ppl']:.2f}"
    assert row[4] == f"{summary['total']['bytes'] / 1e9:.4g}"
    assert (out / "ppl_vs_bytes.png").read_bytes()[:8] == PNG_MAGIC
    bad = run_cli("report", str(tmp_path / "nope"), "--out", str(out))
    assert bad.returncode == 2 and re.search(r"nope: not a directory", bad.stderr)
    assert "Traceback" not in bad.stderr
