"""Secure aggregation through the real simulation: the same perplexity as without it, to
the fixed-point precision (the sum in the ring is exact), and the server never decodes
an individual update."""

import json

import pytest

from skyfed.api import run

SMOKE = {"threads": 1, "clouds.aggregation_s": 0.01}


def _ppl(result):
    return [r["val_ppl"] for r in result.metrics()], result.summary["final"]["val_ppl"]


@pytest.mark.parametrize("strategy", ["fedavg", "fedadam"])
def test_secure_aggregation_ends_at_the_plain_runs_perplexity(tmp_path, strategy):
    over = {**SMOKE, "federation.strategy.name": strategy}
    plain = run(preset="smoke", overrides=over, out=tmp_path / "plain")
    secure = run(preset="smoke", overrides={**over, "security.secure_aggregation": True, "security.secagg.bound": 1.0},
                 out=tmp_path / "secure")
    rows_p, final_p = _ppl(plain)
    rows_s, final_s = _ppl(secure)
    assert all(r["aggregated"] for r in secure.metrics())
    assert final_s == pytest.approx(final_p, rel=1e-3)  # fixed point: 32-bit ring, bound 1.0 -> ~1e-8 per coordinate
    assert rows_s == pytest.approx(rows_p, rel=1e-3)
    line = secure.metrics()[-1]
    assert line["secure_aggregation"]["dropped"] == [] and sorted(line["secure_aggregation"]["survivors"]) == ["aws", "azure", "gcp"]
    # a 32-bit ring sends as many bytes as fp32, never fewer than the masked vector itself
    assert line["bytes_up"] >= 3 * 4 * secure.summary["params"] * 0.9
    assert json.loads((tmp_path / "secure" / "summary.json").read_text())["mode"] == "federated"
