"""Simulated clients with their state on disk (`simulation.client_state: disk`): the same
results as resident clients, bit for bit; one model replica for all of them; each
client's state in its own safetensors file in the run directory; the state files'
format and bookkeeping; the memory savings that do not change a number (error feedback
that consumes its input, server states dropped once no client holds them)."""

import json
import math

import pytest
import torch

from skyfed.compression.chain import Chain
from skyfed.compression.channel import Downlink
from skyfed.compression.feedback import ErrorFeedback
from skyfed.compression.wire import spec_of
from skyfed.config import load_config
from skyfed.errors import CheckpointError, ConfigError
from skyfed.federation.checkpoint import load_checkpoint
from skyfed.runtime.client_state import ClientStateFiles, External, load_state, part_path, save_state
from skyfed.runtime.replica import ReplicaClient
from skyfed.runtime.simulation import run_simulation

TIMING = {"compute_s", "aggregate_s", "eval_s", "wall_time_s", "elapsed_s"}  # measured, not simulated
SETTINGS = [
    "threads=1", "clouds.aggregation_s=0.0", "federation.strategy.name=fedadam",
    "compression.uplink=[{name: topk, fraction: 0.1}, int8]", "compression.error_feedback=true",
    "compression.downlink=[int8]",
]
NAMES = ("aws", "gcp", "azure")


def _run(tmp_path, where: str, extra=()):
    cfg = load_config(None, "smoke", [*SETTINGS, f"simulation.client_state={where}", *extra])
    run, summary = run_simulation(cfg, tmp_path / where)
    params, state = load_checkpoint(run.path / "checkpoint")
    rows = [json.loads(line) for line in (run.path / "metrics.jsonl").read_text().splitlines()]
    return params, [{k: v for k, v in r.items() if k not in TIMING} for r in rows], summary, state


def test_disk_equals_memory_bit_for_bit(tmp_path):
    """smoke: 3 clients, 2 rounds, FedAdam, top-k + int8 uplink with error feedback, int8 delta downlink."""
    pm, rm, sm, state_m = _run(tmp_path, "memory")
    pd, rd, sd, state_d = _run(tmp_path, "disk")
    assert pm.keys() == pd.keys() and all(torch.equal(pm[n], pd[n]) for n in pm)
    assert rm == rd and len(rd) == 2
    assert sm["final"] == sd["final"] and sm["total"] == sd["total"] and sm["sim_time_s"] == sd["sim_time_s"]
    # resident clients checkpoint their states; clients on disk name their files
    assert state_m["parts"]["transport"]["client_files"] is None and set(state_m["parts"]["transport"]["clients"]) == set(NAMES)
    assert state_d["parts"]["transport"]["clients"] == {}
    assert state_d["parts"]["transport"]["client_files"] == {n: f"{n}.2.safetensors" for n in NAMES}
    assert not (tmp_path / "memory" / "clients").exists()


def test_disk_equals_memory_with_local_steps_by_speed(tmp_path):
    """Clients on disk share one replica, which takes each client's own step count and
    learning-rate schedule (skyfed.federation.steps) as resident clients do."""
    extra = ["federation.strategy.name=fedasync", "federation.steps_by_speed=true", "clouds.profiles={azure: {speed: 0.25}}"]
    pm, rm, _, _ = _run(tmp_path, "memory", extra)
    pd, rd, _, _ = _run(tmp_path, "disk", extra)
    assert all(torch.equal(pm[n], pd[n]) for n in pm) and rm == rd
    assert rd[-1]["local_steps_done"] == rd[-1]["local_steps_budget"] == 2 * 3 * 5  # smoke: 2 rounds x 5 steps
    assert sum(r["arrivals"].count("azure") for r in rd) < sum(r["arrivals"].count("aws") for r in rd)


@pytest.mark.parametrize("apart", [True, False], ids=["parts_apart", "one_file"])
def test_state_files_in_the_run_dir_and_one_replica(tmp_path, monkeypatch, apart):
    import skyfed.runtime.replica as replica_mod
    from skyfed.runtime.assemble import assemble
    from skyfed.runtime.simulation import simulated_transports

    # the smoke model is small: its state is one file unless the threshold says it is large
    assert replica_mod.LARGE_BYTES == 64 * 2**20
    if apart:
        monkeypatch.setattr(replica_mod, "LARGE_BYTES", 0)

    cfg = load_config(None, "smoke", [*SETTINGS, "federation.rounds=1"])
    assert cfg.simulation.client_state == "disk"  # the default
    out = tmp_path / "run"
    run = assemble(cfg, simulated_transports(out), out)
    run.engine.run()
    clients = run.transport.clients
    assert all(type(c) is ReplicaClient for c in clients.values())
    assert len({id(c.replica) for c in clients.values()}) == 1  # one model replica for every client
    assert not any(hasattr(c, "trainer") or hasattr(c, "model") for c in clients.values())
    replica = next(iter(clients.values())).replica.client  # holds no client's state between tasks
    assert len(replica.trainer.optimizer.state) == 0 and replica.downlink.held is None
    assert replica.uplink.feedback.residual == {}
    assert all(p.grad is None for p in replica.trainer.model.parameters())
    assert list((out / "clients" / "updates").iterdir()) == []  # every update was received
    files = sorted(p.name for p in (out / "clients").iterdir() if p.is_file())
    # each state; for a large model with its held model (written before training) and moments (after) apart
    parts = ("", ".downlink", ".trainer") if apart else ("",)
    assert files == sorted(["initial.safetensors", *(f"{n}.1{p}.safetensors" for n in NAMES for p in parts)])
    state = load_state(out / "clients" / "gcp.1.safetensors")
    params = dict(replica.trainer.model.named_parameters())
    moments = state["trainer"]["optimizer"]["state"]
    assert state["trainer"]["step"] == cfg.train.local_steps and len(moments) == len(params)
    assert {tuple(m["exp_avg"].shape) for m in moments.values()} == {tuple(p.shape) for p in params.values()}
    assert set(state["residual"]) == set(params) and any(bool(r.abs().sum() > 0) for r in state["residual"].values())
    assert set(state["downlink"]["held"]) == set(params) and state["downlink"]["tag"] == 1
    run.transport.close()


def test_updates_in_flight_wait_in_files(tmp_path):
    """However many clients answer a round, one update at a time is in memory."""
    from skyfed.runtime.assemble import assemble
    from skyfed.runtime.simulation import simulated_transports

    cfg = load_config(None, "smoke", [*SETTINGS, "federation.rounds=1"])
    out = tmp_path / "run"
    run = assemble(cfg, simulated_transports(out), out)
    link, core = run.transport, run.engine.core
    for name in NAMES:
        link.send(name, core.task(name, 0, cfg.train.local_steps, {}))
    folder = out / "clients" / "updates"
    assert [r.payload for _, _, r in link._queue] == [None, None, None]
    sizes = sorted(p.stat().st_size for p in folder.iterdir())
    assert len(sizes) == 3 and sizes[0] > 1000
    inline = link.state_dict()["queue"]  # a checkpoint holds them inline
    assert [len(r.payload) for _, _, r in sorted(inline)] == [p.stat().st_size for p in sorted(folder.iterdir(), key=lambda p: int(p.stem))]
    first = link.receive()
    assert first.client == "aws" and first.payload == inline[0][2].payload and len(list(folder.iterdir())) == 2
    assert [link.receive().client for _ in range(2)] == ["gcp", "azure"] and list(folder.iterdir()) == []
    run.transport.close()


def test_state_file_round_trip(tmp_path):
    base = torch.arange(12, dtype=torch.float32)
    shared = torch.randn(3, 4)
    state = {
        "optimizer": {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.randn(2, 5)}},
                      "param_groups": [{"params": [0, 1], "betas": (0.9, 0.95), "foreach": None, "lr": 1e-3}]},
        "step": 7, "nan": float("nan"), "name": "aws", "empty": {},
        "bf16": torch.randn(4).to(torch.bfloat16), "a": shared, "b": shared,
        "views": [base[:6], base[6:]], "strided": base.view(3, 4).T,
    }
    path = tmp_path / "x.1.safetensors"
    save_state(state, path)
    got = load_state(path)
    assert got["optimizer"]["param_groups"] == state["optimizer"]["param_groups"]
    assert list(got["optimizer"]["state"]) == [0] and got["optimizer"]["state"][0]["step"].dim() == 0
    assert torch.equal(got["optimizer"]["state"][0]["exp_avg"], state["optimizer"]["state"][0]["exp_avg"])
    assert got["step"] == 7 and math.isnan(got["nan"]) and got["name"] == "aws" and got["empty"] == {}
    assert got["bf16"].dtype == torch.bfloat16 and torch.equal(got["bf16"], state["bf16"])
    assert got["a"] is got["b"] and torch.equal(got["a"], shared)
    assert torch.equal(torch.cat(got["views"]), base) and torch.equal(got["strided"], base.view(3, 4).T)
    before = path.read_bytes()
    got["optimizer"]["state"][0]["exp_avg"].add_(1.0)  # a loaded state is ours to train in ...
    assert path.read_bytes() == before  # ... and the file stays as it was
    with pytest.raises(TypeError):
        save_state({"x": object()}, tmp_path / "y.1.safetensors")
    save_state({"moments": shared}, part_path(path, "trainer"))  # a part written apart, named by the state
    assert part_path(path, "trainer").name == "x.1.trainer.safetensors"
    save_state({"trainer": External("x.1.trainer.safetensors"), "tag": 2}, path)
    got = load_state(path)
    assert got["tag"] == 2 and torch.equal(got["trainer"]["moments"], shared)
    assert not list(tmp_path.glob("*.tmp*"))  # every write was atomic: no temporary file left


def test_state_files_generations_and_resume(tmp_path):
    files = ClientStateFiles(tmp_path)
    for _ in range(3):
        for n in ("a", "b"):
            save_state({"n": n}, files.next(n))
        named = files.state_dict()  # a checkpoint: keeps its files and the previous checkpoint's
    assert named == {"a": "a.3.safetensors", "b": "b.3.safetensors"}
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{n}.{g}.safetensors" for n in "ab" for g in (2, 3)]
    (tmp_path / "initial.safetensors").write_bytes(b"kept")
    save_state({"moments": 1}, part_path(files.next("a"), "trainer"))  # after the checkpoint, then the run stops
    (tmp_path / "b.4.safetensors.tmp123").write_bytes(b"half")
    resumed = ClientStateFiles(tmp_path)
    resumed.load_state_dict(named)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.3.safetensors", "b.3.safetensors", "initial.safetensors"]
    assert resumed.current("a") == tmp_path / "a.3.safetensors" and resumed.next("a") == tmp_path / "a.4.safetensors"
    (tmp_path / "b.3.safetensors").unlink()
    with pytest.raises(CheckpointError) as err:
        ClientStateFiles(tmp_path).load_state_dict(named)
    assert "b.3.safetensors is missing" in str(err.value) and "\n" not in str(err.value)


def test_state_files_are_flushed_once_per_checkpoint_not_per_file(tmp_path, monkeypatch):
    import skyfed.runtime.client_state as client_state

    fsyncs, syncs = [], []
    monkeypatch.setattr(client_state.os, "fsync", lambda fd: fsyncs.append(fd))
    monkeypatch.setattr(client_state, "sync_filesystem", lambda folder: syncs.append(folder))
    files = ClientStateFiles(tmp_path)
    for n in ("a", "b", "c"):
        path = files.next(n)
        save_state({"m": torch.ones(3)}, part_path(path, "trainer"))
        save_state({"n": n, "trainer": External(part_path(path, "trainer").name)}, path)
    assert fsyncs == [] and syncs == []  # six files written, none flushed one by one
    files.state_dict()
    assert syncs == [tmp_path]  # the checkpoint flushes them all, in one call


@pytest.mark.parametrize("specs", [["int8"], [{"name": "topk", "fraction": 0.1}, "int8"], [{"name": "lowrank", "rank": 2}], ["fp16"]])
def test_feedback_that_consumes_its_input_sends_the_same(specs):
    chain, plain, eager = Chain.from_specs(specs), ErrorFeedback(), ErrorFeedback()
    g = torch.Generator().manual_seed(1)
    for step in range(3):
        x = {"w": torch.randn(40, 30, generator=g), "b": torch.randn(7, generator=g)}
        parts, _ = plain.encode(x, chain.salted(step))
        mine = {k: v.clone() for k, v in x.items()}
        parts2, sent = eager.encode(mine, chain.salted(step), consume=True)
        assert sent is None and mine == {}
        assert parts.keys() == parts2.keys() and all(torch.equal(parts[k], parts2[k]) for k in parts)
        assert all(torch.equal(plain.residual[k], eager.residual[k]) for k in x)


def test_downlink_drops_states_no_client_holds():
    spec = spec_of({"w": torch.zeros(10)})
    dl = Downlink(Chain.from_specs(["int8"]), spec)
    dl.clients = {"a", "b"}
    params = {"w": torch.randn(10)}
    dl.payload_for("a", params, 0, 0)
    assert set(dl.held) == {0, 1}  # b has not been met: it still holds the initial model
    dl.payload_for("b", params, 0, 0)
    assert set(dl.held) == {1}
    dl.settle(["a", "b"], ["a", "b"])
    params = {"w": params["w"] + 1}
    dl.payload_for("a", params, 1, 1)
    assert set(dl.held) == {1, 2}  # b holds state 1
    dl.payload_for("b", params, 1, 1)
    assert set(dl.held) == {2}


def test_config():
    assert load_config(None, "smoke").simulation.client_state == "disk"
    with pytest.raises(ConfigError) as err:
        load_config(None, "smoke", ["simulation.client_state=ram"])
    assert "simulation.client_state" in str(err.value)
    with pytest.raises(ConfigError) as err:
        load_config(None, "smoke", ["train.activation_checkpointing=true", "security.dp.document={noise_multiplier: 1.0}"])
    assert "activation_checkpointing" in str(err.value) and "\n" not in str(err.value)


def test_activation_checkpointing_trains_the_same():
    import numpy as np

    from skyfed.runtime.setup import new_model
    from skyfed.train import LocalTrainer

    class Tok:
        eos_token_id = 0

        def __len__(self):
            return 97

    tokens = np.random.default_rng(0).integers(0, 97, 4000).astype(np.int32)
    out = []
    for on in (False, True):
        cfg = load_config(None, "smoke", [f"train.activation_checkpointing={on}", "model.preset=llama-tiny"])
        trainer = LocalTrainer(new_model(cfg, Tok()), cfg.train, torch.device("cpu"), 10)
        assert any(getattr(m, "gradient_checkpointing", False) for m in trainer.model.modules()) == on
        torch.manual_seed(0)
        trainer.train(tokens, 3, np.random.default_rng(1))
        out.append({n: p.detach().clone() for n, p in trainer.model.named_parameters()})
    assert all(torch.allclose(out[0][n], out[1][n], rtol=0, atol=1e-6) for n in out[0])
