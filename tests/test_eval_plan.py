"""Cheaper evaluation (issue 17 item 5): eval.interval, eval.max_tokens, summary.json's `eval`."""

import json

import pytest
import torch

import skyfed
from skyfed.config import load_config
from skyfed.eval_plan import evaluation_due
from skyfed.federation.engine import Engine
from skyfed.federation.strategies import build_strategy
from skyfed.metrics import RunDir
from skyfed.model import federated_parameter_names
from skyfed.report import write_report
from skyfed.runtime.grpc.statuspage import perplexity_svg
from skyfed.runtime.inprocess import InProcessTransport
from skyfed.runtime.setup import make_client, make_evaluator, new_model, prepare_data
from skyfed.train import eval_window_budget, evaluate

CPU = torch.device("cpu")
CHEAP = ["federation.rounds=3", "eval.interval=2", "eval.max_tokens=100", "eval.final_max_batches=null"]


def test_window_budget_takes_the_smaller_cap():
    assert eval_window_budget(32, 8, 4, None) == 32  # 4 batches of 8 windows
    assert eval_window_budget(32, 8, 4, 100) == 3  # 100 tokens: 3 windows of 32
    assert eval_window_budget(32, 8, 1, 10_000) == 8
    assert eval_window_budget(32, 8, None, 10) == 1  # at least one window
    assert eval_window_budget(32, 8, None, None) is None


def test_interval_evaluates_every_nth_round_and_always_the_last():
    assert [r for r in range(7) if evaluation_due(r, 7, 3)] == [2, 5, 6]
    assert [r for r in range(6) if evaluation_due(r, 6, 3)] == [2, 5]
    assert [r for r in range(4) if evaluation_due(r, 4, 1)] == [0, 1, 2, 3]
    assert [r for r in range(3) if evaluation_due(r, 3, 10)] == [2]


@pytest.fixture(scope="module")
def smoke():
    cfg = load_config(preset="smoke", overrides=CHEAP)
    return cfg, prepare_data(cfg)


def test_token_budget_counts_predicted_tokens(smoke):
    cfg, data = smoke
    model = new_model(cfg, data.tokenizer)
    valid = data.valid.tokens
    whole = evaluate(model, valid, 32, 8, CPU)
    assert whole.tokens == (len(valid) - 1) // 32 * 32
    assert evaluate(model, valid, 32, 8, CPU, max_tokens=100).tokens == 96
    assert evaluate(model, valid, 32, 8, CPU, max_batches=1, max_tokens=10_000).tokens == 256
    # the same windows as max_batches when the budgets agree
    a = evaluate(model, valid, 32, 8, CPU, max_batches=1)
    b = evaluate(model, valid, 32, 8, CPU, max_tokens=256)
    assert a.tokens == b.tokens == 256 and a.loss == b.loss


def test_cheap_run_metrics_summary_and_report(tmp_path):
    result = skyfed.run(preset="smoke", overrides=CHEAP, out=tmp_path / "run")
    rows = result.metrics()
    assert [r["evaluated"] for r in rows] == [False, True, True]
    assert "val_ppl" not in rows[0] and rows[0]["eval_s"] == 0.0
    assert [r["val_tokens"] for r in rows[1:]] == [96, 96]
    ev = result.summary["eval"]
    valid_tokens = ev["valid_split_tokens"]
    assert ev["interval"] == 2 and ev["max_tokens"] == 100 and ev["tokens_per_eval"] == 96
    assert ev["rounds_evaluated"] == 2 and ev["round_eval_tokens"] == 192
    assert ev["final_whole_split"] is True and ev["final_tokens"] == valid_tokens == result.summary["final"]["val_tokens"]
    assert valid_tokens > 96
    # skyfed report: the table and the perplexity curve from the evaluated rounds only
    report = write_report([tmp_path / "run"], tmp_path / "report")
    assert (tmp_path / "report" / "ppl_vs_round.png").exists()
    assert "no plot of validation perplexity vs round" not in report.read_text()
    groups = json.loads((tmp_path / "report" / "report.json").read_text())["groups"]
    assert groups[0]["val_ppl"]["mean"] == pytest.approx(result.summary["final"]["val_ppl"])


def test_sync_baseline_follows_the_interval(tmp_path):
    result = skyfed.run(preset="smoke", overrides=CHEAP, out=tmp_path / "sync", baseline="sync")
    assert [r["evaluated"] for r in result.metrics()] == [False, True, True]
    assert result.summary["eval"]["rounds_evaluated"] == 2


def _engine(cfg, data, run_dir):
    clients = [make_client(cfg, c.name, i, data.client_tokens[c.name], data.tokenizer, CPU)
               for i, c in enumerate(cfg.federation.clients)]
    model = new_model(cfg, data.tokenizer)
    return Engine(cfg, InProcessTransport(clients), model, federated_parameter_names(model), build_strategy("fedavg"),
                  make_evaluator(cfg, data.valid.tokens, CPU), RunDir(run_dir))


def test_resume_after_an_unevaluated_round(smoke, tmp_path):
    cfg, data = smoke
    _engine(cfg, data, tmp_path).run_round(0)  # not evaluated; checkpointed
    fresh = _engine(cfg, data, tmp_path)
    assert fresh.resume() == 0
    fresh.run()
    rows = RunDir(tmp_path).read_metrics()
    assert [(r["round"], r["evaluated"]) for r in rows] == [(0, False), (1, True), (2, True)]


def test_status_page_curve_skips_unevaluated_rounds():
    history = [{"round": 0, "duration_s": 1.0}, {"round": 1, "duration_s": 1.0, "val_ppl": 50.0, "val_loss": 3.9}]
    svg = perplexity_svg(history)
    assert "round 1: 50.00" in svg and "round 0:" not in svg
