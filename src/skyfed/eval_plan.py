"""When the run evaluates and how much: `eval.interval`, `eval.max_batches`, `eval.max_tokens`.

Evaluating every round on a large slice of the validation split costs about a tenth of a
run's wall time (issue 17, item 5). A run evaluates the global model after rounds
interval-1, 2*interval-1, ... and always after its last round, on the windows that
`skyfed.train.eval_window_budget` allows; the final evaluation (summary.json `final`)
is separate and uses `eval.final_max_batches` (None: the whole split). A metrics.jsonl
line of a round that was not evaluated has `evaluated: false` and no `val_*` fields.
"""

from __future__ import annotations

from typing import Any, Callable

from skyfed.config import ExperimentConfig
from skyfed.train import EvalResult, eval_window_budget, eval_windows

Evaluator = Callable[..., EvalResult]


def evaluation_due(round: int, rounds: int, interval: int) -> bool:
    """True after rounds interval-1, 2*interval-1, ... (0-based) and after the last one."""
    return (round + 1) % interval == 0 or round >= rounds - 1


def evaluate_round(evaluator: Evaluator, model: Any, max_batches: int | None, max_tokens: int | None) -> EvalResult:
    """One per-round evaluation; the token budget is passed only when set, so evaluators
    written as `f(model, max_batches)` keep working."""
    if max_tokens is None:
        return evaluator(model, max_batches)
    return evaluator(model, max_batches, max_tokens)


def eval_fields(ev: EvalResult | None) -> dict[str, Any]:
    """The metrics.jsonl fields of one window: the validation numbers, or `evaluated: false`."""
    if ev is None:
        return {"evaluated": False}
    return {"evaluated": True, "val_loss": ev.loss, "val_ppl": ev.ppl, "val_token_acc": ev.token_acc, "val_tokens": ev.tokens}


def eval_summary(cfg: ExperimentConfig, rows: list[dict[str, Any]], final: EvalResult, valid_tokens: int) -> dict[str, Any]:
    """summary.json's `eval`: what the per-round evaluations and the final one covered."""
    ec = cfg.eval
    seq_len = min(cfg.train.seq_len, valid_tokens - 1)
    whole = len(eval_windows(valid_tokens, seq_len, None)) * seq_len
    budget = eval_window_budget(seq_len, ec.batch_size, ec.max_batches, ec.max_tokens)
    per_round = whole if budget is None else min(budget, whole // seq_len) * seq_len
    evaluated = [r for r in rows if r.get("evaluated", "val_loss" in r)]
    return {
        "interval": ec.interval,
        "max_batches": ec.max_batches,
        "max_tokens": ec.max_tokens,
        "tokens_per_eval": per_round,  # predicted tokens of each per-round evaluation
        "rounds_evaluated": len(evaluated),
        "round_eval_tokens": sum(int(r.get("val_tokens", per_round)) for r in evaluated),
        "round_eval_s": sum(float(r.get("eval_s", 0.0)) for r in rows),
        "final_tokens": final.tokens,
        "final_whole_split": final.tokens == whole,
        "valid_split_tokens": whole,  # predicted tokens in the whole split (non-overlapping windows)
    }
