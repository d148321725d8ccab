"""The Ray runtime (`runtime: ray`): the same results as the in-process simulation, an exact
resume with the clients' state in the object store or on disk, one-line errors, and Ray
shut down whatever happens.

Ray starts once for the module (2 CPUs, a 200 MB object store): starting it takes long on
a loaded machine. The first test starts and stops its own.
"""

import json
import os

import numpy as np
import pytest
import torch

ray = pytest.importorskip("ray")
# Ray's own memory monitor kills actors when the whole machine is short of memory, which a
# test shares with other work (pytest-xdist workers, benchmarks); these tests use little.
os.environ.setdefault("RAY_memory_monitor_refresh_ms", "0")

from skyfed.config import load_config  # noqa: E402
from skyfed.errors import ConfigError, SkyfedError  # noqa: E402
from skyfed.federation.checkpoint import load_checkpoint  # noqa: E402
from skyfed.federation.messages import TrainTask  # noqa: E402
from skyfed.runtime.assemble import assemble  # noqa: E402
from skyfed.runtime.ray import RayTransport, ray_transport  # noqa: E402
from skyfed.runtime.setup import prepare_data  # noqa: E402
from skyfed.runtime.simulation import run_simulation  # noqa: E402

pytestmark = pytest.mark.processes

SMOKE = ["threads=1", "clouds.aggregation_s=0.0", "ray.num_cpus=2", "ray.object_store_mb=200", "ray.actors=2"]
TIMING = {"compute_s", "aggregate_s", "eval_s", "wall_time_s", "elapsed_s"}  # measured, not simulated


def _run(tmp_path, label: str, extra: list[str], **kwargs):
    cfg = load_config(None, "smoke", SMOKE + extra)
    run, summary = run_simulation(cfg, tmp_path / label, **kwargs)
    params, _ = load_checkpoint(run.path / "checkpoint")
    rounds = [json.loads(line) for line in (run.path / "metrics.jsonl").read_text().splitlines()]
    return params, [{k: v for k, v in r.items() if k not in TIMING} for r in rounds], summary


def _assert_same(a, b):
    (pa, ra, sa), (pb, rb, sb) = a, b
    assert set(pa) == set(pb)
    for name in pa:
        assert torch.equal(pa[name], pb[name]), name
    assert ra == rb
    assert sa["final"] == sb["final"]
    assert sa["sim_time_s"] == sb["sim_time_s"]
    assert sa["egress_cost_usd"] == sb["egress_cost_usd"]


class _Stop(Exception):
    pass


def test_ray_is_shut_down_when_the_run_fails(tmp_path):
    assert not ray.is_initialized()

    def stop(kind, data):
        if kind == "local_step":  # replayed in the driver while collecting the first results
            raise _Stop()

    with pytest.raises(_Stop):
        run_simulation(load_config(None, "smoke", SMOKE + ["runtime=ray"]), tmp_path / "r", on_event=stop)
    assert not ray.is_initialized()


@pytest.fixture(scope="module")
def shared_ray():
    ray.init(num_cpus=2, object_store_memory=200 * 2**20, include_dashboard=False)
    yield
    ray.shutdown()


@pytest.mark.parametrize("extra", [
    [],
    ["federation.strategy.name=fedadam"],
    ["federation.strategy.name=dynamic"],
    ["federation.strategy.name=fedasync"],
    ["compression.uplink=[int8]", "compression.downlink=[int8]"],  # residuals and held models travel
], ids=["fedavg", "fedadam", "dynamic", "fedasync", "int8"])
def test_ray_equals_inprocess(tmp_path, shared_ray, extra):
    ours = _run(tmp_path, "ray", ["runtime=ray", *extra])
    _assert_same(_run(tmp_path, "inprocess", extra), ours)
    assert ours[2]["runtime"] == "ray" and ours[2]["ray_actors"] == 2
    assert ray.is_initialized()  # a Ray this run did not start is left running


@pytest.mark.parametrize("where", ["object_store", "disk"])
def test_ray_resume_is_exact(tmp_path, shared_ray, where):
    extra = ["runtime=ray", f"ray.client_state={where}", "federation.rounds=3",
             "compression.uplink=[int8]", "compression.downlink=[int8]"]
    whole = _run(tmp_path, "whole", extra)

    def stop(kind, data):
        if kind == "round_end" and data["round"] == 1:  # after round 1's checkpoint
            raise _Stop()

    with pytest.raises(_Stop):
        _run(tmp_path, "cut", extra, on_event=stop)
    if where == "disk":  # the checkpoint of round 1 names generation-2 files; round 0's are kept too
        _, saved = load_checkpoint(tmp_path / "cut" / "checkpoint")
        assert saved["parts"]["transport"]["client_files"] == {n: f"{n}.2.safetensors" for n in ("aws", "gcp", "azure")}
        files = sorted(p.name for p in (tmp_path / "cut" / "clients").iterdir() if p.is_file())
        parts = ("", ".downlink", ".trainer")  # a state, and the parts of it written apart
        assert files == sorted(f"{n}.{g}{p}.safetensors" for n in ("aws", "gcp", "azure") for g in (1, 2) for p in parts)
    _assert_same(whole, _run(tmp_path, "cut", extra, resume=True))


def test_a_failing_client_is_one_line(shared_ray):
    cfg = load_config(None, "smoke", SMOKE + ["runtime=ray"])
    data = prepare_data(cfg)
    link = RayTransport(cfg, data.tokenizer, {"a": np.zeros(64, dtype=np.int32)})
    try:
        link._states["a"] = ray.put({"not": "a client state"})  # a corrupt state
        link.send("a", TrainTask(0, 0, b"", 1))
        with pytest.raises(SkyfedError) as err:
            link.receive()
        assert str(err.value) == "client a failed in a Ray actor: KeyError: 'trainer'"
    finally:
        link.close()
    assert ray.is_initialized()


@pytest.mark.parametrize("delta", [True, False])
def test_one_payload_per_round_in_the_object_store(tmp_path, shared_ray, delta):
    cfg = load_config(None, "smoke", SMOKE + ["runtime=ray", "federation.num_clients=6", f"compression.downlink_delta={delta}"])
    run = assemble(cfg, ray_transport(tmp_path), tmp_path)
    try:
        run.engine.run()
        assert run.transport.payload_puts == 2  # two rounds, six clients each
    finally:
        run.transport.close()


def test_config():
    cfg = load_config(None, "smoke", ["runtime=ray", "federation.num_clients=1000"])
    names = [c.name for c in cfg.federation.clients]
    assert names[:2] == ["client0000", "client0001"] and names[-1] == "client0999" and len(set(names)) == 1000
    assert [c.cloud for c in cfg.federation.clients[:4]] == ["aws", "gcp", "azure", "aws"]
    assert load_config(None, "smoke").runtime == "inprocess"
    with pytest.raises(ConfigError) as err:
        load_config(None, "smoke", ["workers=2"])
    assert "`workers` was removed" in str(err.value) and "runtime: ray" in str(err.value) and "\n" not in str(err.value)
