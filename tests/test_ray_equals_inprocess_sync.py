"""`runtime: ray` gives the in-process simulation's results bit for bit: synchronous
strategies (mean, FedOpt) and a codec chain whose residuals and held models travel with
the clients' state. The asynchronous and dynamic ones: test_ray_equals_inprocess_async.py."""

import pytest
from ray_harness import check_ray_equals_inprocess, shared_ray  # noqa: F401

pytestmark = pytest.mark.processes


@pytest.mark.parametrize("extra", [
    [],
    ["federation.strategy.name=fedadam"],
    ["compression.uplink=[int8]", "compression.downlink=[int8]"],  # residuals and held models travel
], ids=["fedavg", "fedadam", "int8"])
def test_ray_equals_inprocess(tmp_path, shared_ray, extra):  # noqa: F811
    check_ray_equals_inprocess(tmp_path, extra)
