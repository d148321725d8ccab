"""`runtime: ray` gives the in-process simulation's results bit for bit: dynamic weighted
aggregation and an asynchronous strategy (the synchronous ones:
test_ray_equals_inprocess_sync.py)."""

import pytest
from ray_harness import check_ray_equals_inprocess, shared_ray  # noqa: F401

pytestmark = pytest.mark.processes


@pytest.mark.parametrize("extra", [
    ["federation.strategy.name=dynamic"],
    ["federation.strategy.name=fedasync"],
], ids=["dynamic", "fedasync"])
def test_ray_equals_inprocess(tmp_path, shared_ray, extra):  # noqa: F811
    check_ray_equals_inprocess(tmp_path, extra, actors=1)  # the strategies differ on the server only
