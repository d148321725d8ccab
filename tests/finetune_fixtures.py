"""A pretrained model for the fine-tuning tests: a sequential-baseline run of the smoke preset
(gpt2-tiny at width 256, so that LoRA tensors are large beside their wire headers) on
WikiText-2 topics 0-2 of 4. Its `model/` folder is a Hugging Face model with its tokenizer.
It is made once per test session: under pytest-xdist the first worker to need it trains it
in a folder the workers share, holding a file lock, and the others wait and reuse it."""

import os
from pathlib import Path

import pytest
from conftest import run_cli
from filelock import FileLock

PRETRAIN = ["--preset", "smoke", "--set", "model.preset=gpt2-tiny", "--set", "model.overrides.n_embd=256",
            "--set", "data.partition.num_topics=4"]


@pytest.fixture(scope="session")
def pretrained(tmp_path_factory, shared_cache) -> Path:
    if "PYTEST_XDIST_WORKER" not in os.environ:
        return _pretrain(tmp_path_factory.mktemp("pretrain") / "run")
    shared = tmp_path_factory.getbasetemp().parent / "pretrain"
    shared.mkdir(exist_ok=True)
    with FileLock(str(shared / "lock")):
        if (shared / "run" / "model" / "config.json").exists():
            return shared / "run"
        return _pretrain(shared / "run")


def _pretrain(out: Path) -> Path:
    res = run_cli("run", *PRETRAIN, "--set", "data.topics=[0,1,2]", "--baseline", "sequential", "--out", str(out))
    assert res.returncode == 0, res.stderr[-2000:]
    return out
