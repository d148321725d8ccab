"""The engine through the in-process transport: selection, FedAvg, rejection, checkpoints."""

import json

import numpy as np
import pytest
import torch

from skyfed.config import load_config
from skyfed.federation.engine import Engine, select_clients
from skyfed.federation.strategies import build_strategy
from skyfed.federation.strategies.aggregate import weighted_mean
from skyfed.metrics import RunDir
from skyfed.model import federated_parameter_names, get_params
from skyfed.runtime.inprocess import InProcessTransport
from skyfed.runtime.setup import make_client, make_evaluator, new_model, prepare_data


@pytest.fixture(scope="module")
def smoke():
    cfg = load_config(preset="smoke", overrides=["federation.rounds=2"])
    return cfg, prepare_data(cfg)


def _engine(cfg, data, run_dir, clients=None, strategy=None):
    device = torch.device("cpu")
    if clients is None:
        clients = [make_client(cfg, c.name, i, data.client_tokens[c.name], data.tokenizer, device)
                   for i, c in enumerate(cfg.federation.clients)]
    model = new_model(cfg, data.tokenizer)
    strategy = strategy or build_strategy(cfg.federation.strategy.name, cfg.federation.strategy.params)
    return Engine(cfg, InProcessTransport(clients), model, federated_parameter_names(model), strategy,
                  make_evaluator(cfg, data.valid.tokens, device), RunDir(run_dir)), clients


def test_select_clients_is_seeded_and_respects_the_minimum():
    names = [f"c{i}" for i in range(10)]
    a = select_clients(names, 0.3, 1, np.random.default_rng(5))
    assert a == select_clients(names, 0.3, 1, np.random.default_rng(5))
    assert len(a) == 3 and a == sorted(a, key=names.index)
    assert len(select_clients(names, 0.1, 4, np.random.default_rng(0))) == 4
    assert select_clients(names, 1.0, 1, np.random.default_rng(0)) == names


def test_weighted_mean_is_exact():
    a = {"w": torch.tensor([1.0, 2.0])}
    b = {"w": torch.tensor([4.0, 8.0])}
    out = weighted_mean([a, b], [1, 3])
    assert torch.allclose(out["w"], torch.tensor([3.25, 6.5]))


def test_fedavg_round_equals_token_weighted_mean_of_client_models(smoke, tmp_path):
    cfg, data = smoke
    engine, clients = _engine(cfg, data, tmp_path)
    start = {n: t.clone() for n, t in engine.params.items()}
    engine.run_round(0)
    # replay each client's round from the same start to get its local model
    replay, _ = _engine(cfg, data, tmp_path / "replay")
    models, weights = [], []
    for i, c in enumerate(cfg.federation.clients):
        client = make_client(cfg, c.name, i, data.client_tokens[c.name], data.tokenizer, torch.device("cpu"))
        from skyfed.compression.payload import encode_payload
        from skyfed.federation.messages import TrainTask

        result = client.handle(TrainTask(0, 0, encode_payload(start, kind="model"), cfg.train.local_steps))
        models.append(get_params(client.trainer.model, replay.core.param_names))
        weights.append(result.num_tokens)
    expected = weighted_mean(models, weights)
    for n in engine.params:
        torch.testing.assert_close(engine.params[n], expected[n], atol=1e-6, rtol=0)


def test_streaming_and_buffered_aggregation_train_the_same_model(smoke, tmp_path):
    """FedAdam through real in-process clients: folding each update as it arrives gives
    the model that aggregating the round's list gives (to float rounding)."""
    cfg, data = smoke
    engines = []
    for stream in (True, False):
        engine, _ = _engine(cfg, data, tmp_path / str(stream), strategy=build_strategy("fedadam"))
        engine.stream_aggregate = stream
        records = [engine.run_round(r) for r in range(2)]
        engines.append((engine, records))
    (streamed, s_rec), (buffered, b_rec) = engines
    for n in streamed.params:
        torch.testing.assert_close(streamed.params[n], buffered.params[n], atol=1e-6, rtol=0)
    assert streamed.version == buffered.version == 2
    for a, b in zip(s_rec, b_rec):
        assert a["train_loss"] == b["train_loss"] and a["bytes_up_by_client"] == b["bytes_up_by_client"]
        assert a["weights"] == pytest.approx(b["weights"])
        assert a["pseudo_grad_norm"] == pytest.approx(b["pseudo_grad_norm"], rel=1e-5)


def test_a_corrupt_update_is_rejected_and_the_model_is_untouched(smoke, tmp_path, caplog):
    cfg, data = smoke
    cfg = cfg.model_copy(update={"federation": cfg.federation.model_copy(update={"min_clients": 3})})
    engine, clients = _engine(cfg, data, tmp_path)
    original = clients[1].handle

    def tampered(task):
        result = original(task)
        result.payload = result.payload[:-10] + b"\x00" * 10
        return result

    clients[1].handle = tampered
    before = {n: t.clone() for n, t in engine.params.items()}
    record = engine.run_round(0)
    assert "checksum mismatch" in record["rejected"]["gcp"]
    assert record["aggregated"] is False  # 2 good updates < min_clients = 3
    assert record["version"] == 0
    for n in before:
        assert torch.equal(engine.params[n], before[n])
    assert "rejected the update from gcp" in caplog.text


def test_checkpoint_resume_continues_after_the_last_complete_round(smoke, tmp_path):
    cfg, data = smoke
    engine, _ = _engine(cfg, data, tmp_path)
    engine.run_round(0)
    saved = {n: t.clone() for n, t in engine.params.items()}
    with open(tmp_path / "metrics.jsonl", "a") as f:  # a round that crashed before its checkpoint
        f.write(json.dumps({"round": 1, "val_ppl": 0}) + "\n")
    fresh, _ = _engine(cfg, data, tmp_path)
    fresh.resume()
    assert fresh.next_round == 1 and fresh.version == 1
    for n in saved:
        assert torch.equal(fresh.params[n], saved[n])
    assert [r["round"] for r in RunDir(tmp_path).read_metrics()] == [0]
    fresh.run()
    assert [r["round"] for r in RunDir(tmp_path).read_metrics()] == [0, 1]
