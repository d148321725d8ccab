"""Error feedback with the residual kept in the client's model (CSER's error reset)."""

import numpy as np
import pytest
import torch

from skyfed.compression.chain import Chain
from skyfed.compression.feedback import ErrorFeedback
from skyfed.compression.payload import decode_payload, encode_payload
from skyfed.config import CompressionConfig, TrainConfig
from skyfed.federation.client import FederatedClient
from skyfed.federation.messages import TrainTask
from skyfed.model import build_model, federated_parameter_names, get_params
from skyfed.train import LocalTrainer

VOCAB = 64
TOPK = [{"name": "topk", "fraction": 0.1}]


def test_start_point_is_params_minus_residual_and_update_is_not_compensated_twice():
    ef, chain = ErrorFeedback(in_model=True), Chain.from_specs(TOPK)
    g = torch.Generator().manual_seed(0)
    params = {"w": torch.randn(40, 30, generator=g)}
    assert ef.start_point(params) is params  # nothing unsent yet
    _, sent = ef.encode({"w": torch.randn(40, 30, generator=g)}, chain, compensate=False)
    first_residual = ef.residual["w"].clone()
    assert torch.equal(ef.start_point(params)["w"], params["w"] - first_residual)
    update = {"w": torch.randn(40, 30, generator=g)}  # already holds the residual
    _, sent = ef.encode(update, chain, compensate=False)
    assert torch.equal(sent["w"] + ef.residual["w"], update["w"])  # not update + first residual
    assert int((sent["w"] != 0).sum()) == 120


def make_client(in_model: bool) -> FederatedClient:
    cfg = TrainConfig(local_steps=4, batch_size=4, seq_len=16, lr=1e-2, warmup_steps=0, schedule="constant",
                      weight_decay=0.0, optimizer_state="reset")
    model = build_model("gpt2-micro", VOCAB, 0, seed=1)
    trainer = LocalTrainer(model, cfg, torch.device("cpu"), total_steps=8)
    tokens = np.random.default_rng(0).integers(0, VOCAB, size=3000).astype(np.uint16)
    comp = CompressionConfig(uplink=TOPK, residual_in_model=in_model)
    return FederatedClient("a", tokens, trainer, federated_parameter_names(model), seed=3, compression=comp)


@pytest.mark.parametrize("in_model", [True, False])
def test_client_trains_from_global_minus_its_unsent_residual(in_model):
    client = make_client(in_model)
    starts = []
    train = client.trainer.train

    def spy(*args, **kwargs):
        starts.append(get_params(client.trainer.model, client.param_names))
        return train(*args, **kwargs)

    client.trainer.train = spy
    params = get_params(client.trainer.model, client.param_names)
    residuals = []
    for rnd in range(2):
        before = {k: v.clone() for k, v in client.uplink.feedback.residual.items()}
        result = client.handle(TrainTask(rnd, 0, encode_payload(params, kind="model"), 4, {}))
        sent, _ = decode_payload(result.payload, client.spec)
        end = get_params(client.trainer.model, client.param_names)
        residual = client.uplink.feedback.residual
        for n in params:  # what travels + what stays = the compensated update, exactly
            change = params[n] - end[n]
            expected = change if in_model or not before else change + before[n]
            assert torch.allclose(sent[n] + residual[n], expected, rtol=0, atol=1e-7)
        residuals.append({k: v.clone() for k, v in residual.items()})
    for n in params:
        assert torch.equal(starts[0][n], params[n])
        want = params[n] - residuals[0][n] if in_model else params[n]
        assert torch.equal(starts[1][n], want)
    assert sum(float(r.abs().sum()) for r in residuals[0].values()) > 0
