"""End to end through the real CLI, in subprocesses, on the smoke preset."""

import json

import pytest

from conftest import run_cli

NUMBERS = ("val_loss", "val_ppl", "val_token_acc", "bytes_up", "bytes_down", "train_loss")


def _metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "smoke"
    # `python -m skyfed` in a fresh interpreter, as a user runs it (the other CLI runs of
    # the suite are forked from a server that has imported torch already)
    proc = run_cli("run", "--preset", "smoke", "--out", str(out), "--quiet", fresh=True)
    assert proc.returncode == 0, proc.stderr
    return out, proc


def test_smoke_run_writes_the_run_directory(smoke_run):
    out, proc = smoke_run
    assert "validation perplexity" in proc.stdout  # the summary table
    rows = _metrics(out)
    assert [r["round"] for r in rows] == [0, 1]
    assert all(r["bytes_up"] > 0 and r["bytes_down"] > 0 for r in rows)
    assert set(rows[0]["train_loss"]) == {"aws", "gcp", "azure"}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds"] == 2
    assert summary["total"]["bytes_up"] == sum(r["bytes_up"] for r in rows)
    assert summary["final"]["val_ppl"] > 1 and 0 <= summary["final"]["val_token_acc"] <= 1
    assert (out / "config.yaml").read_text().startswith("name: smoke")


def test_same_seed_gives_identical_metrics(smoke_run, tmp_path):
    first, _ = smoke_run
    proc = run_cli("run", "--preset", "smoke", "--out", str(tmp_path / "again"), "--quiet")
    assert proc.returncode == 0, proc.stderr
    for a, b in zip(_metrics(first), _metrics(tmp_path / "again")):
        assert {k: a[k] for k in NUMBERS} == {k: b[k] for k in NUMBERS}


def test_model_directory_loads_with_transformers_and_generates(smoke_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, _ = smoke_run
    model = AutoModelForCausalLM.from_pretrained(out / "model")
    tok = AutoTokenizer.from_pretrained(out / "model")
    assert model.config.vocab_size == len(tok)
    proc = run_cli("generate", str(out / "model"), "--prompt", "The game", "--max-new-tokens", "20")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("The game") and len(proc.stdout.split()) > 3


def test_folder_of_txt_files_trains_without_code_changes(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    words = "river mountain forest valley ocean desert island glacier canyon meadow".split()
    for i in range(30):
        text = " ".join(words[(i * 7 + j * 3) % len(words)] for j in range(400))
        (corpus / f"doc{i:02d}.txt").write_text(f"Story {i}. {text}.\n")
    out = tmp_path / "run"
    proc = run_cli(
        "run", "--preset", "smoke", "--quiet", "--out", str(out),
        "--set", f"data.path={corpus}", "--set", "data.max_train_tokens=null", "--set", "data.max_valid_tokens=null",
        "--set", "tokenizer.vocab_size=300", "--set", "data.valid_fraction=0.1",
        "--set", "train.local_steps=25", "--set", "train.lr=0.01",
    )
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["final"]["val_tokens"] > 0
    # each word determines the next one here, so a trained model beats the unigram model
    assert summary["final"]["val_ppl"] < 0.5 * summary["unigram_ppl"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--preset", "nope"], "unknown preset 'nope'"),
        (["--preset", "smoke", "--set", "train.bogus=1"], "train.bogus: unknown key"),
        (["--preset", "smoke", "--set", "data.path=/no/such/dir"], "data path not found: /no/such/dir"),
        (["/no/such/config.yaml"], "config file not found: /no/such/config.yaml"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(args, message, tmp_path):
    proc = run_cli("run", *args, "--out", str(tmp_path / "r"), "--quiet")
    assert proc.returncode == 2
    lines = [l for l in proc.stderr.strip().splitlines() if l.strip()]
    assert len(lines) == 1, proc.stderr
    assert message in lines[0]
    assert "Traceback" not in proc.stderr


def test_sync_baseline_runs_from_the_same_command(tmp_path):
    out = tmp_path / "base"
    proc = run_cli("run", "--preset", "smoke", "--baseline", "sync", "--quiet", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["mode"] == "baseline-sync"
    # same tokens as the federated run: 3 clients x 2 rounds x 5 steps x 4 x 32
    assert summary["train_tokens"] == 3 * 2 * 5 * 4 * 32
    assert summary["total"]["bytes"] == 0
