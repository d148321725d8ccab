"""`runtime: ray` gives the in-process simulation's results bit for bit: synchronous
strategies (mean, FedOpt) and a codec chain whose residuals and held models travel with
the clients' state. The asynchronous and dynamic ones: test_ray_equals_inprocess_async.py."""

import pytest
from ray_harness import check_ray_equals_inprocess, shared_ray  # noqa: F401

pytestmark = pytest.mark.processes


# Two actors where client state must travel between them (FedAvg's moments, int8's residuals
# and held models); one for the other families, which differ only on the server (fewer
# actor processes to start: each imports torch).
@pytest.mark.parametrize("extra,actors", [
    ([], 2),
    (["federation.strategy.name=fedadam"], 1),
    (["compression.uplink=[int8]", "compression.downlink=[int8]"], 2),
], ids=["fedavg", "fedadam", "int8"])
def test_ray_equals_inprocess(tmp_path, shared_ray, extra, actors):  # noqa: F811
    check_ray_equals_inprocess(tmp_path, extra, actors)
