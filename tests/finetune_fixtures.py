"""A pretrained model for the fine-tuning tests: a sequential-baseline run of the smoke preset
(gpt2-tiny at width 256, so that LoRA tensors are large beside their wire headers) on
WikiText-2 topics 0-2 of 4. Its `model/` folder is a Hugging Face model with its tokenizer."""

from pathlib import Path

import pytest
from conftest import run_cli

PRETRAIN = ["--preset", "smoke", "--set", "model.preset=gpt2-tiny", "--set", "model.overrides.n_embd=256",
            "--set", "data.partition.num_topics=4"]


@pytest.fixture(scope="session")
def pretrained(tmp_path_factory, shared_cache) -> Path:
    out = tmp_path_factory.mktemp("pretrain") / "run"
    res = run_cli("run", *PRETRAIN, "--set", "data.topics=[0,1,2]", "--baseline", "sequential", "--out", str(out))
    assert res.returncode == 0, res.stderr[-2000:]
    return out
