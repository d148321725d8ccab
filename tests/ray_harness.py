"""What the Ray runtime's tests share: the smoke run under `runtime: ray` beside the
in-process one, the exact comparison of two runs, and one Ray for a whole test module.

Ray starts once per module (2 CPUs, a 200 MB object store): starting it takes long on a
loaded machine. The tests are split over several modules so pytest-xdist runs them side
by side (`--dist loadfile` gives a module to one worker).
"""

import json
import os

import pytest
import torch

ray = pytest.importorskip("ray")
# Ray's own memory monitor kills actors when the whole machine is short of memory, which a
# test shares with other work (pytest-xdist workers, benchmarks); these tests use little.
os.environ.setdefault("RAY_memory_monitor_refresh_ms", "0")

from skyfed.config import load_config  # noqa: E402
from skyfed.federation.checkpoint import load_checkpoint  # noqa: E402
from skyfed.runtime.ray import start_ray  # noqa: E402
from skyfed.runtime.simulation import run_simulation  # noqa: E402

# ray.keep_actors: the runs of a module share their actors, where the Ray is the module's
# (starting an actor is a Python process importing torch: about 4 s of CPU).
SMOKE = ["threads=1", "clouds.aggregation_s=0.0", "ray.num_cpus=2", "ray.object_store_mb=200", "ray.actors=2",
         "ray.keep_actors=true"]
TIMING = {"compute_s", "aggregate_s", "eval_s", "wall_time_s", "elapsed_s"}  # measured, not simulated


def run_smoke(tmp_path, label: str, extra: list[str], **kwargs):
    """The smoke preset with `extra` overrides, in tmp_path/label: (final parameters, the
    metrics lines without their measured times, summary)."""
    cfg = load_config(None, "smoke", SMOKE + extra)
    run, summary = run_simulation(cfg, tmp_path / label, **kwargs)
    params, _ = load_checkpoint(run.path / "checkpoint")
    rounds = [json.loads(line) for line in (run.path / "metrics.jsonl").read_text().splitlines()]
    return params, [{k: v for k, v in r.items() if k not in TIMING} for r in rounds], summary


def assert_same(a, b):
    """Two `run_smoke` results are the same run: parameters bit for bit, every metric, the
    final evaluation, the simulated clock and the egress bill."""
    (pa, ra, sa), (pb, rb, sb) = a, b
    assert set(pa) == set(pb)
    for name in pa:
        assert torch.equal(pa[name], pb[name]), name
    assert ra == rb
    assert sa["final"] == sb["final"]
    assert sa["sim_time_s"] == sb["sim_time_s"]
    assert sa["egress_cost_usd"] == sb["egress_cost_usd"]


class Stop(Exception):
    """Raised from an event callback to stop a run where a test wants it stopped."""


@pytest.fixture(scope="module")
def shared_ray():
    assert start_ray(load_config(None, "smoke", SMOKE))  # 2 CPUs, a 200 MB object store
    yield
    ray.shutdown()


def check_ray_equals_inprocess(tmp_path, extra: list[str], actors: int = 2) -> None:
    """The smoke run with `extra` under `runtime: ray` with `actors` actors equals the
    in-process one, and leaves running the Ray it did not start. With 2 actors a client's
    consecutive tasks run on different actors, so its state moves between them."""
    ours = run_smoke(tmp_path, "ray", ["runtime=ray", f"ray.actors={actors}", *extra])
    assert_same(run_smoke(tmp_path, "inprocess", extra), ours)
    assert ours[2]["runtime"] == "ray" and ours[2]["ray_actors"] == actors
    assert ray.is_initialized()
