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


def test_summary_bytes_count_the_control_messages(tmp_path, monkeypatch):
    """summary.json's bytes are exactly what crossed the transport: the masked vectors,
    the keys / shares / unmask messages both ways and the shares bundle each training
    task carries in its options (counted here at the transport, independently)."""
    from collections import Counter

    from skyfed.runtime.inprocess import SimulatedTransport
    from skyfed.security.secagg.coordinator import option_bytes

    up, down = Counter(), Counter()
    send, receive = SimulatedTransport.send, SimulatedTransport.receive

    def counting_send(self, client, task):
        stage = task.options.get("secagg", {}).get("stage", "update")
        if stage == "mask":  # a training task: the model, and the shares bundle in its options
            down["update"] += len(task.payload)
            down["bundle"] += option_bytes({"secagg": task.options["secagg"]})
        else:
            down[stage] += len(task.payload)
        return send(self, client, task)

    def counting_receive(self, timeout=None):
        result = receive(self, timeout)
        if result is not None:
            up[result.meta.get("secagg_stage", "update")] += len(result.payload or b"")
        return result

    monkeypatch.setattr(SimulatedTransport, "send", counting_send)
    monkeypatch.setattr(SimulatedTransport, "receive", counting_receive)
    secure = run(preset="smoke", overrides={**SMOKE, "security.secure_aggregation": True}, out=tmp_path / "secure")
    assert set(up) == {"keys", "shares", "update", "unmask"} and set(down) == {"keys", "shares", "update", "bundle", "unmask"}
    control_up = up["keys"] + up["shares"] + up["unmask"]
    control_down = down["keys"] + down["shares"] + down["bundle"] + down["unmask"]
    assert control_up > 2 * 3 * 1000  # about 1.7 KB per client and round among three clients
    total = secure.summary["total"]
    assert total["bytes_up"] == up["update"] + control_up
    assert total["bytes_down"] == down["update"] + control_down
    rows = secure.metrics()
    assert sum(r["secagg_bytes_up"] for r in rows) == control_up
    assert sum(r["secagg_bytes_down"] for r in rows) == control_down
