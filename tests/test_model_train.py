import math

import numpy as np
import pytest
import torch

from skyfed.config import TrainConfig
from skyfed.errors import ConfigError
from skyfed.model import build_model, federated_parameter_names, get_params, num_parameters, set_params
from skyfed.train import LocalTrainer, eval_windows, evaluate, lr_at, unigram_perplexity


def test_gpt2_tiny_has_about_one_million_parameters():
    model = build_model("gpt2-tiny", vocab_size=4096)
    assert 0.9e6 <= num_parameters(model) <= 1.0e6
    assert model.config.n_layer == 2 and model.config.n_embd == 128 and model.config.n_positions == 128


def test_llama_tiny_builds_and_runs():
    model = build_model("llama-tiny", vocab_size=512)
    out = model(input_ids=torch.randint(0, 512, (2, 16))).logits
    assert out.shape == (2, 16, 512)


def test_federated_names_list_tied_weights_once():
    model = build_model("gpt2-micro", vocab_size=300)
    names = federated_parameter_names(model)
    assert len(names) == len(set(names))
    assert "transformer.wte.weight" in names and "lm_head.weight" not in names
    assert sum(p.numel() for p in get_params(model, names).values()) == num_parameters(model)


def test_get_set_params_round_trip():
    a, b = build_model("gpt2-micro", 300, seed=1), build_model("gpt2-micro", 300, seed=2)
    names = federated_parameter_names(a)
    set_params(b, get_params(a, names))
    for n in names:
        assert torch.equal(dict(a.named_parameters())[n], dict(b.named_parameters())[n])


def test_unknown_model_preset():
    with pytest.raises(ConfigError, match="unknown model preset 'gpt5'"):
        build_model("gpt5")


def test_lr_schedule_warmup_then_cosine_to_floor():
    cfg = TrainConfig(lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_at(0, 100, cfg) == pytest.approx(0.1)
    assert lr_at(9, 100, cfg) == pytest.approx(1.0)
    assert lr_at(10, 100, cfg) == pytest.approx(1.0)
    assert lr_at(55, 100, cfg) == pytest.approx(0.55)
    assert lr_at(100, 100, cfg) == pytest.approx(0.1)
    # stretched twice as long: step 100 is at (100 - 10) / (200 - 10) of the decay
    stretched = TrainConfig(lr=1.0, warmup_steps=10, min_lr_ratio=0.1, schedule_stretch=2.0)
    assert lr_at(5, 100, stretched) == lr_at(5, 100, cfg)  # the warmup is not stretched
    assert lr_at(100, 100, stretched) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 90 / 190)))
    assert lr_at(200, 100, stretched) == pytest.approx(0.1)


def test_local_training_lowers_loss_on_repetitive_text():
    torch.manual_seed(0)
    tokens = np.tile(np.arange(50, dtype=np.uint16), 200)
    model = build_model("gpt2-micro", vocab_size=64)
    cfg = TrainConfig(local_steps=60, batch_size=8, seq_len=32, lr=5e-3, warmup_steps=5)
    before = evaluate(model, tokens, 32, 8, torch.device("cpu"), max_batches=2)
    LocalTrainer(model, cfg, torch.device("cpu"), total_steps=60).train(tokens, 60, np.random.default_rng(0))
    after = evaluate(model, tokens, 32, 8, torch.device("cpu"), max_batches=2)
    assert after.loss < 0.5 * before.loss
    assert after.token_acc > 0.9  # the next token of a counting sequence is learnable
    assert after.ppl == pytest.approx(math.exp(after.loss))


def test_eval_windows_are_evenly_spread_and_disjoint():
    starts = eval_windows(10_000, 100, 10)
    assert len(starts) == 10 and starts[0] == 0 and starts[-1] == 9800
    assert (np.diff(starts) >= 100).all()
    assert len(eval_windows(1000, 100, None)) == 9


def test_unigram_perplexity_of_uniform_tokens_is_vocab_size():
    tokens = np.tile(np.arange(8), 1000)
    assert unigram_perplexity(tokens, tokens, 8) == pytest.approx(8.0, rel=1e-3)
