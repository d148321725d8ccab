"""Document-level DP-SGD with opacus on the project's models."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from skyfed.config import DocumentDPConfig, TrainConfig
from skyfed.model import build_model, get_params
from skyfed.security.accounting import dpsgd_epsilon
from skyfed.security.dpsgd import (
    DPSGDTrainer,
    disjoint_windows,
    document_spans,
    document_windows,
    max_windows_per_document,
    window_loss,
)
from skyfed.train import LocalTrainer

VOCAB = 300


def test_disjoint_windows_put_every_token_in_one_window():
    tokens = np.arange(23)
    w = disjoint_windows(tokens, seq_len=4)  # windows of 5 tokens; the last 3 left out
    assert w.shape == (4, 5)
    assert w.ravel().tolist() == list(range(20))


def test_max_windows_per_document():
    eos = 0
    # windows of 5: [1 1 1 1 0] [2 2 2 2 2] [2 2 0 3 0] [4 4 4 4 4]
    tokens = np.array([1, 1, 1, 1, 0, 2, 2, 2, 2, 2, 2, 2, 0, 3, 0, 4, 4, 4, 4, 4])
    assert max_windows_per_document(tokens, 4, eos) == 2  # the document of 2s spans windows 1 and 2
    assert max_windows_per_document(tokens[:10], 4, eos) == 1
    assert max_windows_per_document(tokens, 4, None) == 4  # no boundaries known: the whole shard


@pytest.mark.parametrize("preset", ["gpt2-micro", "llama-tiny"])
def test_per_window_gradients_match_one_window_at_a_time(preset):
    """opacus' per-sample gradients (hooks, with tied embeddings) equal each window's own gradient."""
    from opacus.grad_sample.utils import prepare_module

    model = build_model(preset, VOCAB, 0, seed=0)
    batch = torch.randint(1, VOCAB, (3, 9), generator=torch.Generator().manual_seed(0))
    gsm = prepare_module(model, "hooks", batch_first=True, loss_reduction="mean")
    window_loss(gsm, batch).backward()
    named = dict(model.named_parameters())
    samples = {n: p.grad_sample.clone() for n, p in named.items()}
    gsm._close()
    for i in range(3):
        model.zero_grad(set_to_none=True)
        window_loss(model, batch[i : i + 1]).backward()
        for n, p in named.items():
            assert torch.allclose(samples[n][i], p.grad, atol=1e-5, rtol=1e-4), (preset, n, i)


def _trainer(noise: float = 1.0, clip: float = 1.0) -> DPSGDTrainer:
    cfg = TrainConfig(local_steps=1, batch_size=4, seq_len=16, lr=1e-2, warmup_steps=0)
    model = build_model("gpt2-micro", VOCAB, 0, seed=0)
    plain = LocalTrainer(model, cfg, torch.device("cpu"), total_steps=10)
    return DPSGDTrainer(plain, DocumentDPConfig(noise_multiplier=noise, max_grad_norm=clip), delta=1e-5)


def _tokens(n: int = 1700) -> np.ndarray:
    rng = np.random.default_rng(0)
    tokens = rng.integers(1, VOCAB, n)
    tokens[::100] = 0  # a document ends every 100 tokens
    return tokens


def test_one_dp_sgd_step_on_gpt2_micro_reports_a_document_epsilon():
    trainer = _trainer()
    before = get_params(trainer.model, [n for n, _ in trainer.model.named_parameters()])
    tokens = _tokens()
    stats = trainer.train(tokens, 1, np.random.default_rng(0))
    after = get_params(trainer.model, list(before))
    assert any(not torch.equal(before[n], after[n]) for n in before)
    windows = len(tokens) // 17
    report = trainer.report()
    assert report["windows"] == windows and report["steps"] == 1
    assert report["sample_rate"] == 4 / windows
    assert report["epsilon_local"] == dpsgd_epsilon(4 / windows, 1.0, 1, 1e-5) > 0
    assert report["max_windows_per_document"] == 7  # a 100-token document touches at most ceil(100/17) + 1 windows
    assert stats.tokens == 4 * 16  # the expected count, not the sampled one


def test_dp_sgd_clips_each_window_before_summing():
    trainer = _trainer(clip=0.01)
    windows = torch.from_numpy(disjoint_windows(_tokens(), 16)[:6].astype(np.int64))
    trainer.optimizer.zero_grad(set_to_none=True)
    window_loss(trainer.gsm, windows).backward()
    trainer.optimizer.clip_and_accumulate()
    params = trainer.optimizer.params
    per_window = torch.stack([p.grad_sample.reshape(6, -1).norm(dim=1) for p in params]).norm(dim=0)
    assert (per_window > 0.01).all()  # every raw per-window gradient is larger than the bound
    summed = torch.cat([p.summed_grad.reshape(-1) for p in params]).norm().item()
    assert summed <= 6 * 0.01 * (1 + 1e-4)


def test_an_empty_poisson_sample_is_a_noise_only_step():
    trainer = _trainer()
    class NothingSampled:
        def random(self, n: int) -> np.ndarray:
            return np.ones(n)

    trainer.sampler = NothingSampled()
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    stats = trainer.train(_tokens(), 1, np.random.default_rng(0))
    assert np.isnan(stats.loss_last)
    assert any(not torch.equal(before[n], p) for n, p in trainer.model.named_parameters())


def test_document_spans_and_windows_stay_inside_their_document():
    tokens = np.array([5, 6, 7, 0, 8, 0, 1, 2, 3, 4, 5, 6, 0, 9])  # docs [0,4) [4,6) [6,13) [13,14)
    spans = document_spans(tokens, eos_id=0)
    assert spans.tolist() == [[0, 4], [4, 6], [6, 13]]  # the 1-token tail has no next-token pair
    rows, lengths = document_windows(tokens, spans, 5, pad_id=0, rng=np.random.default_rng(0))
    assert lengths.tolist() == [4, 2, 5]
    assert rows[0].tolist() == [5, 6, 7, 0, 0] and rows[1].tolist() == [8, 0, 0, 0, 0]
    window = rows[2].tolist()
    assert any(window == tokens[s : s + 5].tolist() for s in range(6, 9))  # inside [6, 13)


def test_padding_does_not_change_a_windows_loss():
    """A padded window scores its real tokens only, whatever else is in the batch."""
    model = build_model("gpt2-micro", VOCAB, 0, seed=0)
    g = torch.Generator().manual_seed(1)
    real = torch.randint(1, VOCAB, (1, 6), generator=g)
    padded = torch.cat([real, torch.zeros(1, 4, dtype=torch.long)], dim=1)
    other = torch.randint(1, VOCAB, (1, 10), generator=g)
    alone = window_loss(model, real)
    in_batch = window_loss(model, torch.cat([padded, other]), torch.tensor([6, 10]))
    assert torch.allclose(2 * in_batch - window_loss(model, other), alone, atol=1e-5)


def test_document_unit_samples_documents_and_reports_group_size_one():
    cfg = TrainConfig(local_steps=1, batch_size=4, seq_len=16, lr=1e-2, warmup_steps=0)
    plain = LocalTrainer(build_model("gpt2-micro", VOCAB, 0, seed=0), cfg, torch.device("cpu"), total_steps=10)
    trainer = DPSGDTrainer(plain, DocumentDPConfig(noise_multiplier=1.0, unit="document"), delta=1e-5)
    tokens = _tokens()  # a document ends every 100 tokens: 17 documents (the first is the lone EOS, dropped)
    trainer.train(tokens, 2, np.random.default_rng(0))
    report = trainer.report()
    docs = len(document_spans(tokens, 0))
    assert report["unit"] == "document" and report["documents"] == docs
    assert report["sample_rate"] == 4 / docs and report["max_windows_per_document"] == 1
    assert report["epsilon_local"] == dpsgd_epsilon(4 / docs, 1.0, 2, 1e-5)
