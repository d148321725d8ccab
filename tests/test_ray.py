"""The Ray runtime (`runtime: ray`): its config, Ray shut down whatever happens, a failing
client in one line, a round's model put in the object store once. The rest of its tests:
test_ray_equals_inprocess_{sync,async}.py (the same results as the in-process
simulation) and test_ray_resume.py (exact resume); tests/ray_harness.py has what they
share. The first test needs Ray not started: it runs before the module's shared Ray."""

import os

import numpy as np
import pytest
from ray_harness import SMOKE, Stop, assert_same, ray, run_smoke, shared_ray  # noqa: F401

from skyfed.config import load_config
from skyfed.errors import ConfigError, SkyfedError
from skyfed.federation.messages import TrainTask
from skyfed.runtime.assemble import assemble
from skyfed.runtime.ray import RayTransport, ray_transport, start_ray
from skyfed.runtime.setup import prepare_data
from skyfed.runtime.simulation import run_simulation


@pytest.mark.processes
def test_ray_is_shut_down_when_the_run_fails(tmp_path):
    assert not ray.is_initialized()

    def stop(kind, data):
        if kind == "local_step":  # replayed in the driver while collecting the first results
            raise Stop()

    with pytest.raises(Stop):
        run_simulation(load_config(None, "smoke", SMOKE + ["runtime=ray", "ray.actors=1"]), tmp_path / "r", on_event=stop)
    assert not ray.is_initialized()


@pytest.mark.processes
def test_actors_train_at_the_drivers_priority_and_a_failing_client_is_one_line(shared_ray):  # noqa: F811
    cfg = load_config(None, "smoke", SMOKE + ["runtime=ray", "ray.actors=1"])
    data = prepare_data(cfg)
    link = RayTransport(cfg, data.tokenizer, {"a": np.zeros(64, dtype=np.int32)})
    try:
        # Ray's default worker niceness (15) starved the actors on a busy machine
        (pid,) = ray.get([a.pid.remote() for a in link._actors])
        assert pid != os.getpid() and os.getpriority(os.PRIO_PROCESS, pid) == os.getpriority(os.PRIO_PROCESS, 0)
        link._states["a"] = ray.put({"not": "a client state"})  # a corrupt state
        link.send("a", TrainTask(0, 0, b"", 1))
        with pytest.raises(SkyfedError) as err:
            link.receive()
        assert str(err.value) == "client a failed in a Ray actor: KeyError: 'trainer'"
    finally:
        link.close()
    assert ray.is_initialized()


@pytest.mark.processes
@pytest.mark.parametrize("delta", [True, False])
def test_one_payload_per_round_in_the_object_store(tmp_path, shared_ray, delta):  # noqa: F811
    cfg = load_config(None, "smoke", SMOKE + ["runtime=ray", "ray.actors=1", "federation.num_clients=6", f"compression.downlink_delta={delta}"])
    run = assemble(cfg, ray_transport(tmp_path), tmp_path)
    try:
        run.engine.run()
        assert run.transport.payload_puts == 2  # two rounds, six clients each
    finally:
        run.transport.close()


@pytest.mark.processes
def test_kept_actors_serve_the_next_run_with_its_own_config(tmp_path, shared_ray):  # noqa: F811
    """`ray.keep_actors`: a second run, with another strategy, rebuilds its replicas in the
    first run's actors instead of starting processes, and still equals the in-process run;
    kept actors of another size are stopped, so they hold no CPU a new actor needs."""
    from skyfed.runtime import ray as ray_runtime

    def kept_pids() -> list[int]:
        return sorted(ray.get([a.pid.remote() for _, _, a in ray_runtime._KEPT]))

    ray_runtime._KEPT.clear()
    keep = ["runtime=ray", "ray.actors=2", "ray.keep_actors=true"]
    run_smoke(tmp_path, "first", keep)
    first = kept_pids()
    assert len(first) == 2 and os.getpid() not in first
    fedadam = ["federation.strategy.name=fedadam"]
    assert_same(run_smoke(tmp_path, "second", keep + fedadam), run_smoke(tmp_path, "inprocess", fedadam))
    assert kept_pids() == first
    # one actor of both CPUs (ray.num_cpus=2): the two kept ones must make room
    run_smoke(tmp_path, "big", ["runtime=ray", "ray.actors=1", "ray.num_cpus_per_actor=2", "ray.keep_actors=false"])
    assert ray_runtime._KEPT == []


def test_config():
    cfg = load_config(None, "smoke", ["runtime=ray", "federation.num_clients=1000"])
    names = [c.name for c in cfg.federation.clients]
    assert names[:2] == ["client0000", "client0001"] and names[-1] == "client0999" and len(set(names)) == 1000
    assert [c.cloud for c in cfg.federation.clients[:4]] == ["aws", "gcp", "azure", "aws"]
    assert load_config(None, "smoke").runtime == "inprocess"
    with pytest.raises(ConfigError) as err:
        load_config(None, "smoke", ["workers=2"])
    assert "`workers` was removed" in str(err.value) and "runtime: ray" in str(err.value) and "\n" not in str(err.value)


def test_a_local_ray_that_times_out_at_start_is_started_once_more(monkeypatch):
    calls = []

    def init(address=None, **kwargs):
        calls.append(address)
        if len(calls) == 1:
            raise Exception("The current node timed out during startup. This could happen because ...")

    monkeypatch.setattr(ray, "init", init)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    assert start_ray(load_config(None, "smoke", SMOKE)) is True
    assert calls == [None, None]
    calls.clear()
    with pytest.raises(SkyfedError) as err:  # any other failure, or a second timeout, is one line
        start_ray(load_config(None, "smoke", SMOKE + ["ray.address=ray://nowhere:1"]))
    assert calls == ["ray://nowhere:1"] and "timed out during startup" in str(err.value)
