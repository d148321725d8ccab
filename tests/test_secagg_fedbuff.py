"""FedBuff under secure aggregation in the simulation: one secure sum per buffer
(federation/loops/secure_buffer.py). Every publication is checked against the plain
arithmetic of the clients' own deltas: x_new = x_old - s(tau) * sum n_i d_i / sum n_i
over the buffer's survivors, s(tau) = (tau + 1)^-0.5."""

from __future__ import annotations

import pytest
import torch

from skyfed.api import run
from skyfed.federation.client import FederatedClient
from skyfed.federation.messages import ClientResult
from skyfed.federation.server import ServerCore
from skyfed.security.secagg.participant import SecAggParticipant

SIX = [{"name": n, "cloud": c} for n, c in [("aws", "aws"), ("gcp", "gcp"), ("azure", "azure"),
                                            ("aws2", "aws"), ("gcp2", "gcp"), ("azure2", "azure")]]
FAIL = {("aws", 0), ("gcp2", 3), ("azure2", 3)}  # (client, task): its training result is an error


def test_each_buffer_is_the_staleness_weighted_secure_mean_of_its_survivors(tmp_path, monkeypatch, caplog):
    deltas, published = {}, []
    masked, publish, handle = SecAggParticipant.masked_payload, ServerCore.publish, FederatedClient.handle

    def recording_masked(self, task, delta, tokens):
        deltas[(self.name, task.round)] = ({k: v.detach().double().clone() for k, v in delta.items()}, tokens)
        return masked(self, task, delta, tokens)

    def recording_publish(self, out):
        before = {k: v.detach().double().clone() for k, v in self.params.items()}
        publish(self, out)
        published.append((before, {k: v.detach().double().clone() for k, v in self.params.items()}))

    def failing_handle(self, task):
        if (self.name, task.round) in FAIL and task.options.get("secagg", {}).get("stage") == "mask":
            return ClientResult(self.name, task.round, task.version, None, error="injected failure")
        return handle(self, task)

    monkeypatch.setattr(SecAggParticipant, "masked_payload", recording_masked)
    monkeypatch.setattr(ServerCore, "publish", recording_publish)
    monkeypatch.setattr(FederatedClient, "handle", failing_handle)
    over = {"threads": 1, "clouds.aggregation_s": 0.01, "federation.clients": SIX, "federation.strategy.name": "fedbuff",
            "federation.strategy.params": {"buffer_size": 3}, "security.secure_aggregation": True,
            "security.secagg.bound": 1.0}
    result = run(preset="smoke", overrides=over, out=tmp_path / "run")

    buffers = [b for row in result.metrics() for b in row["secure_aggregation"]]
    assert [(b["task"], b["survivors"], b["dropped"], b["staleness"]) for b in buffers] == [
        (0, ["azure", "gcp"], ["aws"], 0),  # aws dropped after masking: the sum of the other two
        (6, ["aws", "azure", "gcp"], [], 0),
        (9, ["aws2", "azure2", "gcp2"], [], 1),  # started from version 1, applied at version 2
    ]  # task 3 (aws2, gcp2, azure2): two of three dropped, threshold 2: refused, not published
    assert len(published) == 3
    assert caplog.text.count("buffer of task 3: secure aggregation refused") == 1
    assert sorted(result.metrics()[0]["rejected"]) == ["aws", "azure2", "gcp2"]  # their error results
    for (before, after), b in zip(published, buffers):
        rows = [deltas[(c, b["task"])] for c in b["survivors"]]
        total = sum(n for _, n in rows)
        weight = (b["staleness"] + 1) ** -0.5
        for k in after:
            expected = before[k] - weight * sum(d[k] * n for d, n in rows) / total
            assert (after[k] - expected).abs().max().item() <= 1e-6, (b["task"], k)
    # the staleness weight shows: without it the last buffer would land elsewhere
    before, after = published[-1]
    rows = [deltas[(c, 9)] for c in buffers[-1]["survivors"]]
    unweighted = {k: before[k] - sum(d[k] * n for d, n in rows) / sum(n for _, n in rows) for k in after}
    assert max((after[k] - unweighted[k]).abs().max().item() for k in after) > 1e-4
    assert result.summary["final"]["val_ppl"] < result.metrics()[0]["val_ppl"]


def test_fedbuff_share_cap_is_refused_under_secure_aggregation():
    from skyfed.config import load_config

    with pytest.raises(Exception, match="cannot cap max_client_share"):
        load_config(None, "smoke", ["security.secure_aggregation=true", "federation.strategy.name=fedbuff",
                                    "federation.strategy.params={max_client_share: 0.5}"])
