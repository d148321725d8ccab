"""Fine-tuning a pretrained model: its own tokenizer, a mismatched one refused, LoRA adapters
on the wire, the adapter and the merged model in the run directory.

The pretrained model (tests/finetune_fixtures.py) is a sequential-baseline run of the smoke
preset on WikiText-2 topics 0-2 (of 4); its `model/` folder is a Hugging Face model with its
tokenizer.
"""

import json
import os
from pathlib import Path

import pytest
import torch
from conftest import run_cli, run_clis
from finetune_fixtures import PRETRAIN, pretrained  # noqa: F401  (a fixture)
from safetensors import safe_open

from skyfed.config import load_config
from skyfed.errors import ConfigError


def _evaluate(model_dir: Path, overrides: list[str]):
    """The model's validation result on the windows a run's final evaluation uses."""
    from transformers import AutoModelForCausalLM

    from skyfed.runtime.setup import prepare_data
    from skyfed.train import evaluate

    cfg = load_config(preset="smoke", overrides=overrides)
    data = prepare_data(cfg)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir))
    return evaluate(model, data.valid.tokens, cfg.train.seq_len, cfg.eval.batch_size, torch.device("cpu"),
                    cfg.eval.final_max_batches)


def _one_line_error(res) -> str:
    assert res.returncode == 2, res.stderr[-2000:]
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    return lines[0]


def test_mismatched_tokenizer_is_refused_by_the_cli(pretrained, tmp_path):
    from skyfed.data.corpus import load_corpus
    from skyfed.data.tokenizer import train_bpe

    docs = load_corpus().train[:40]
    train_bpe(docs, 300).save_pretrained(str(tmp_path / "tok300"))
    train_bpe(load_corpus().train[:200], 1000).save_pretrained(str(tmp_path / "tok1000"))
    base = ["run", "--preset", "smoke", "--out", str(tmp_path / "x"), "--set", f"model.path={pretrained / 'model'}"]
    tok300, tok1000, not_a_model, missing = run_clis(
        [*base, "--set", f"tokenizer.path={tmp_path / 'tok300'}"],
        [*base, "--set", f"tokenizer.path={tmp_path / 'tok1000'}"],
        [*base[:-1], f"model.path={tmp_path / 'tok300'}"],
        [*base[:-1], f"model.path={tmp_path / 'missing'}"],
    )
    line = _one_line_error(tok300)
    assert "vocabulary (300 tokens) differs" in line and "512 tokens" in line
    line = _one_line_error(tok1000)
    assert "1000 tokens" in line and "512 embedding rows" in line
    line = _one_line_error(not_a_model)
    assert line == f"error: model.path: {tmp_path / 'tok300'} is not a Hugging Face model directory (no config.json)"
    line = _one_line_error(missing)
    assert line == f"error: model.path: model directory not found: {tmp_path / 'missing'}"
    assert not (tmp_path / "x" / "metrics.jsonl").exists()


def test_a_finetune_starts_from_the_pretrained_weights_and_tokenizer(pretrained):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from skyfed.model import get_params
    from skyfed.runtime.setup import make_client, new_model, prepare_data
    from skyfed.train import evaluate

    model_dir = pretrained / "model"
    # same data as the pretraining run; no tokenizer.path: the model's own is used
    cfg = load_config(preset="smoke", overrides=PRETRAIN[3::2] + ["data.topics=[0,1,2]", f"model.path={model_dir}"])
    data = prepare_data(cfg)
    assert data.tokenizer.get_vocab() == AutoTokenizer.from_pretrained(str(model_dir)).get_vocab()
    loaded = AutoModelForCausalLM.from_pretrained(str(model_dir)).state_dict()
    model = new_model(cfg, data.tokenizer)
    assert all(torch.equal(t, loaded[n]) for n, t in model.state_dict().items())
    client = make_client(cfg, "aws", 0, data.client_tokens["aws"], data.tokenizer, torch.device("cpu"))
    start = get_params(client.trainer.model, client.param_names)
    assert all(torch.equal(t, loaded[n]) for n, t in start.items())
    # its perplexity on the same validation split is the one the pretraining run reported
    final = json.loads((pretrained / "summary.json").read_text())["final"]
    ev = evaluate(model, data.valid.tokens, cfg.train.seq_len, cfg.eval.batch_size, torch.device("cpu"),
                  cfg.eval.final_max_batches)
    assert ev.tokens == final["val_tokens"]
    assert ev.ppl == pytest.approx(final["val_ppl"], rel=1e-6)


def _adapter_fp32_bytes(adapter: Path) -> tuple[int, dict[str, torch.Tensor]]:
    with safe_open(str(adapter / "adapter_model.safetensors"), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    return sum(4 * t.numel() for t in tensors.values()), tensors


def test_lora_finetune_via_the_cli(pretrained, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "lora"
    finetune = [*PRETRAIN[3::2], "data.topics=[3]", "train.lr=0.01", "federation.rounds=3"]
    args = [x for item in finetune for x in ("--set", item)]
    res = run_cli("run", "--preset", "smoke", *args, "--out", str(out), "--set", f"model.path={pretrained / 'model'}",
                  "--set", "model.peft.method=lora", "--set", "model.peft.r=8")
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())

    # the fine-tuning topic's perplexity falls below the pretrained model's on the same windows
    before = _evaluate(pretrained / "model", finetune)
    assert summary["final"]["val_tokens"] == before.tokens
    assert summary["final"]["val_ppl"] < before.ppl

    # only the adapter crosses the wire: bytes per client and round within 2% of its fp32 size
    adapter = out / "adapter"
    assert (adapter / "adapter_config.json").is_file()
    fp32, adapter_tensors = _adapter_fp32_bytes(adapter)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 3
    for row in rows:
        assert row["fp32_bytes_up"] == 3 * fp32
        for sent in [*row["bytes_up_by_client"].values(), *row["bytes_down_by_client"].values()]:
            assert fp32 <= sent <= 1.02 * fp32

    # the checkpoint holds the adapter's tensors only
    ckpt = next((out / "checkpoint").glob("params-*.safetensors"))
    with safe_open(str(ckpt), "pt") as f:
        names = list(f.keys())
    assert names and all(".lora_A." in n or ".lora_B." in n for n in names)
    assert len(names) == len(adapter_tensors)

    # the adapter loads with peft; the merged model's logits equal the PEFT model's
    base = AutoModelForCausalLM.from_pretrained(str(pretrained / "model"))
    peft_model = PeftModel.from_pretrained(base, str(adapter)).eval()
    merged = AutoModelForCausalLM.from_pretrained(str(out / "model")).eval()
    ids = torch.randint(0, 512, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (merged(input_ids=ids).logits - peft_model(input_ids=ids).logits).abs().max().item()
    assert diff < 1e-4
    # and the frozen weights are untouched: only the adapted projections changed
    pre = AutoModelForCausalLM.from_pretrained(str(pretrained / "model")).state_dict()
    changed = sorted(n for n, t in merged.state_dict().items() if not torch.equal(t, pre[n]))
    assert changed == [f"transformer.h.{i}.attn.c_attn.weight" for i in range(2)]


def test_hub_cache_folder_and_snapshot(pretrained, tmp_path):
    from skyfed.model import build_model, resolve_model_dir
    from skyfed.runtime.pretrained import experiment_tokenizer

    root = tmp_path / "models--org--tiny"
    snap = root / "snapshots" / "0123abc"
    (root / "blobs").mkdir(parents=True)
    snap.mkdir(parents=True)
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text("0123abc")
    for i, f in enumerate(sorted((pretrained / "model").iterdir())):
        blob = root / "blobs" / f"blob{i}"
        blob.write_bytes(f.read_bytes())
        os.symlink(os.path.relpath(blob, snap), snap / f.name)
    assert resolve_model_dir(root) == snap.resolve() == resolve_model_dir(snap)
    cfg = load_config(preset="smoke", overrides=[f"model.path={root}"])
    tok, _ = experiment_tokenizer(cfg, [], tmp_path / "cache")
    assert len(tok) == 512
    model = build_model(vocab_size=len(tok), path=str(root), dtype="bfloat16")
    assert next(model.parameters()).dtype == torch.bfloat16
    (root / "refs" / "main").unlink()
    (root / "snapshots" / "other").mkdir()
    with pytest.raises(ConfigError, match="name one of its snapshots"):
        resolve_model_dir(root)


def test_lora_model_federates_only_the_adapter():
    from skyfed.model import build_model, federated_parameter_names, get_params, set_params

    cfg = load_config(preset="smoke", overrides=["model.peft.method=lora", "model.peft.r=4"])
    model = build_model("gpt2-micro", 512, 0, seed=3, peft=cfg.model.peft)
    names = federated_parameter_names(model)
    assert names == [
        "base_model.model.transformer.h.0.attn.c_attn.lora_A.default.weight",
        "base_model.model.transformer.h.0.attn.c_attn.lora_B.default.weight",
    ]
    params = get_params(model, names)
    assert params[names[0]].shape == (4, 32) and params[names[1]].shape == (96, 4)
    assert torch.count_nonzero(params[names[1]]) == 0  # B starts at zero: the model starts as the base
    again = build_model("gpt2-micro", 512, 0, seed=3, peft=cfg.model.peft)
    assert torch.equal(get_params(again, names)[names[0]], params[names[0]])  # same A on every side
    set_params(again, {n: t + 1 for n, t in params.items()})
    assert torch.equal(get_params(again, names)[names[1]], torch.ones(96, 4))
    with pytest.raises(ConfigError, match="model.peft"):
        build_model("gpt2-micro", 512, 0, peft=load_config(
            preset="smoke", overrides=["model.peft.method=lora", "model.peft.target_modules=[nope]"]).model.peft)


def test_a_resumed_lora_run_equals_an_uninterrupted_one(pretrained, tmp_path):
    """The server stops after round 0 and resumes from its checkpoint (the clients live on,
    as in a deployment): the adapter after round 1 equals an uninterrupted run's."""
    from skyfed.federation.engine import Engine
    from skyfed.federation.strategies import build_strategy
    from skyfed.metrics import RunDir
    from skyfed.model import federated_parameter_names
    from skyfed.runtime.inprocess import InProcessTransport
    from skyfed.runtime.setup import make_client, make_evaluator, new_model, prepare_data

    cfg = load_config(preset="smoke", overrides=[f"model.path={pretrained / 'model'}", "model.peft.method=lora",
                                                 "model.peft.r=4", "train.lr=0.01", "compression.uplink=[int8]"])
    data = prepare_data(cfg)
    cpu = torch.device("cpu")

    def clients():
        return [make_client(cfg, c.name, i, data.client_tokens[c.name], data.tokenizer, cpu)
                for i, c in enumerate(cfg.federation.clients)]

    def engine(run_dir, transport):
        model = new_model(cfg, data.tokenizer)
        return Engine(cfg, transport, model, federated_parameter_names(model), build_strategy("fedavg", {}),
                      make_evaluator(cfg, data.valid.tokens, cpu), RunDir(run_dir))

    whole = engine(tmp_path / "whole", InProcessTransport(clients()))
    whole.run()
    survivors = InProcessTransport(clients())
    first = engine(tmp_path / "split", survivors)
    first.run_round(0)  # checkpoints the server state
    second = engine(tmp_path / "split", survivors)
    second.resume()
    second.run()
    assert set(second.params) == set(whole.params) and all("lora_" in n for n in whole.params)
    for name, t in whole.params.items():
        assert torch.equal(second.params[name], t), name


def test_a_model_directory_without_a_tokenizer_needs_tokenizer_path(pretrained, tmp_path):
    import shutil

    from skyfed.runtime.pretrained import experiment_tokenizer

    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(pretrained / "model" / name, bare / name)
    cfg = load_config(preset="smoke", overrides=[f"model.path={bare}"])
    with pytest.raises(ConfigError, match="has no tokenizer .*; set tokenizer.path"):
        experiment_tokenizer(cfg, [], tmp_path / "cache")
    cfg = load_config(preset="smoke", overrides=[f"model.path={bare}", f"tokenizer.path={pretrained / 'model'}"])
    assert len(experiment_tokenizer(cfg, [], tmp_path / "cache")[0]) == 512


def test_select_topics_keeps_whole_topics_of_both_splits():
    import numpy as np

    from skyfed.data.shards import TokenShard
    from skyfed.data.topics import select_topics

    rng = np.random.default_rng(0)

    def shard(kinds):  # kind 0 documents use ids 0-9, kind 1 documents ids 10-19
        docs = [rng.integers(10 * k, 10 * k + 10, size=50) for k in kinds]
        offsets = np.concatenate([[0], np.cumsum([len(d) for d in docs])])
        return TokenShard(np.concatenate(docs).astype(np.uint16), offsets)

    train, valid = shard([0, 1, 0, 1, 1, 0, 0, 1]), shard([1, 0, 1])
    parts = [select_topics(train, valid, [k], 2, seed=5) for k in (0, 1)]
    kinds = [{int(t.tokens[0]) // 10 for t in (tr.subset([i]) for i in range(tr.num_docs))} for tr, _ in parts]
    assert sorted(map(len, kinds)) == [1, 1] and kinds[0] != kinds[1]
    assert parts[0][0].num_docs + parts[1][0].num_docs == 8 and parts[0][1].num_docs + parts[1][1].num_docs == 3
    for tr, va in parts:  # a topic's validation documents are of the same kind as its training documents
        assert set(np.asarray(va.tokens) // 10) == set(np.asarray(tr.tokens) // 10)
    with pytest.raises(ConfigError, match=r"data.topics: topics are 0..1"):
        select_topics(train, valid, [2], 2, seed=5)
