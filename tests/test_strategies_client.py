"""Client-side parts of strategies: FedProx's proximal term and dynamic weighting's holdout."""

import numpy as np
import pytest
import torch

from skyfed.compression.payload import decode_payload, encode_payload
from skyfed.config import TrainConfig
from skyfed.federation.client import FederatedClient
from skyfed.federation.messages import TrainTask
from skyfed.model import build_model, federated_parameter_names, get_params
from skyfed.train import LocalTrainer, evaluate

VOCAB = 64


def make_client(tokens):
    cfg = TrainConfig(local_steps=8, batch_size=4, seq_len=16, lr=1e-2, warmup_steps=0, schedule="constant",
                      weight_decay=0.0, optimizer_state="reset")
    model = build_model("gpt2-micro", VOCAB, 0, seed=1)
    trainer = LocalTrainer(model, cfg, torch.device("cpu"), total_steps=8)
    return FederatedClient("a", tokens, trainer, federated_parameter_names(model), seed=3)


def tokens(n=4000, seed=0):
    return np.random.default_rng(seed).integers(0, VOCAB, size=n).astype(np.uint16)


def delta_norm(client, start, options):
    task = TrainTask(0, 0, encode_payload(start, kind="model"), 8, options)
    result = client.handle(task)
    delta, _ = decode_payload(result.payload, client.spec)
    return float(torch.sqrt(sum((d**2).sum() for d in delta.values()))), result


def test_fedprox_term_keeps_the_model_closer_to_the_start():
    client = make_client(tokens())
    start = get_params(client.trainer.model, client.param_names)
    free, _ = delta_norm(client, start, {})
    again, _ = delta_norm(client, start, {"prox_mu": 0.0})
    prox, _ = delta_norm(client, start, {"prox_mu": 5.0})
    assert again == pytest.approx(free, rel=1e-6)  # mu = 0 is exactly plain training
    assert prox < 0.9 * free


def test_holdout_slice_is_scored_and_never_trained_on():
    toks = tokens(4000)
    client = make_client(toks)
    seen = []
    train = client.trainer.train

    def spy(tokens, *args, **kwargs):
        seen.append(len(tokens))
        return train(tokens, *args, **kwargs)

    client.trainer.train = spy
    start = get_params(client.trainer.model, client.param_names)
    _, plain = delta_norm(client, start, {})
    _, scored = delta_norm(client, start, {"holdout_tokens": 500})
    assert seen == [4000, 3500]
    assert plain.holdout_loss is None
    expected = evaluate(client.trainer.model, toks[-500:], 16, 4, torch.device("cpu")).loss
    assert scored.holdout_loss == pytest.approx(expected, rel=1e-6)
    # capped at a quarter of the shard
    assert len(client.split_holdout(10_000)[1]) == 1000
    # too small for two windows: no holdout
    assert client.split_holdout(20)[1] is None


def test_fedsgd_client_sends_the_mean_gradient_without_training():
    from skyfed.federation.strategies import build_strategy
    from skyfed.train import lm_loss, sample_windows

    toks = tokens(2000)
    client = make_client(toks)
    start = get_params(client.trainer.model, client.param_names)
    opts = build_strategy("fedsgd").client_options(0)
    assert opts == {"send": "gradient"}
    task = TrainTask(5, 0, encode_payload(start, kind="model"), 3, opts)
    result = client.handle(task)
    grad, _ = decode_payload(result.payload, client.spec)
    after = get_params(client.trainer.model, client.param_names)
    assert all(torch.equal(after[n], start[n]) for n in start)  # no local step
    # the same three batches by hand
    model = client.trainer.model
    rng = np.random.default_rng([client.seed, 5])
    rng.integers(2**31)  # the client seeds torch from its round rng first
    model.zero_grad()
    for _ in range(3):
        loss, _ = lm_loss(model, sample_windows(toks, 4, 16, rng))
        (loss / 3).backward()
    params = dict(model.named_parameters())
    for n in ("transformer.wte.weight", "transformer.h.0.mlp.c_fc.weight"):
        assert torch.allclose(grad[n], params[n].grad, atol=1e-6)
    assert result.num_tokens == 3 * 4 * 16
