"""The `attack:` section: config validation, the transport wrapper, junk data, refusal outside simulation."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml

from skyfed.compression.chain import Chain
from skyfed.compression.payload import decode_payload, encode_payload
from skyfed.compression.wire import TensorSpec, read_header
from skyfed.config import ExperimentConfig, dump_config, load_config, refuse_attack
from skyfed.errors import ConfigError
from skyfed.federation import attacks
from skyfed.federation.messages import ClientResult, TrainTask
from skyfed.runtime.attack import AttackTransport, apply_junk_data
from skyfed.runtime.inprocess import SimulatedTransport

SPEC = {"w": TensorSpec((4,), torch.float32)}
FIVE = "federation.clients=[{name: a}, {name: b}, {name: c}, {name: d}, {name: x}]"
DELTAS = {"a": [1.0, 1.0, 0.0, 0.0], "b": [3.0, 1.0, 0.0, 2.0], "c": [2.0, 1.0, 0.0, 1.0], "d": [2.0, 1.0, 0.0, 1.0],
          "x": [1.0, -2.0, 0.5, 0.0]}


class FakeClient:
    """Sends a fixed delta through its uplink codec chain (as FederatedClient does)."""

    def __init__(self, name, chain=None):
        self.name, self.chain = name, chain

    def handle(self, task):
        payload = encode_payload({"w": torch.tensor(DELTAS[self.name])}, self.chain, kind="update", round=task.round,
                                 client=self.name, base_version=task.version)
        return ClientResult(self.name, task.round, task.version, payload, num_tokens=10, train_loss=1.0)


def cfg_with(attack, clients=FIVE):
    return load_config(preset="smoke", overrides=[clients, f"attack={attack}"])


def run_round(cfg, chain=None):
    inner = SimulatedTransport([FakeClient(n, chain) for n in "abcdx"])
    t = AttackTransport(inner, cfg.attack, SPEC, seed=0)
    for n in "abcdx":
        t.send(n, TrainTask(0, 0, b"", 1))
    got = {}
    while (r := t.receive(0.0)) is not None:
        got[r.client] = r
    return t, got


def delta_of(result):
    return decode_payload(result.payload, SPEC)[0]["w"]


@pytest.mark.parametrize("kind,factor,expected", [
    ("sign_flip", 3.0, [-3.0, 6.0, -1.5, 0.0]),
    ("scale", 10.0, [10.0, -20.0, 5.0, 0.0]),
])
def test_update_attacks_replace_only_the_attackers_payload(kind, factor, expected):
    t, got = run_round(cfg_with(f"{{clients: [x], kind: {kind}, factor: {factor}}}"))
    assert delta_of(got["x"]).tolist() == expected and got["x"].meta["attack"] == kind
    for n in "abcd":
        assert delta_of(got[n]).tolist() == DELTAS[n] and "attack" not in got[n].meta
    assert t.poisoned == 1
    header, _ = read_header(got["x"].payload)
    assert header["client"] == "x" and header["round"] == 0 and header["kind"] == "update"


def test_alie_uses_the_honest_updates_of_the_round():
    _, got = run_round(cfg_with("{clients: [x], kind: alie}"))
    honest = [{"w": torch.tensor(DELTAS[n])} for n in "abcd"]
    want = attacks.alie(honest, attacks.alie_z(5, 1))["w"]
    torch.testing.assert_close(delta_of(got["x"]), want)
    # mean (2, 1, 0, 1), std (sqrt(0.5), 0, 0, sqrt(0.5)); z = 0.2533
    assert delta_of(got["x"])[1].item() == 1.0 and delta_of(got["x"])[2].item() == 0.0


def test_noise_has_the_relative_norm():
    _, got = run_round(cfg_with("{clients: [x], kind: noise, factor: 2.0}"))
    assert not torch.equal(delta_of(got["x"]), torch.tensor(DELTAS["x"]))
    assert torch.isfinite(delta_of(got["x"])).all()


def test_the_attackers_own_codec_chain_is_applied():
    chain = Chain.from_specs([{"name": "int8", "block": 4}])
    _, got = run_round(cfg_with("{clients: [x], kind: scale, factor: 10}"), chain)
    header, _ = read_header(got["x"].payload)
    assert header["codecs"] == chain.specs()
    # int8 of (10, -20, 5, 0): scale 20/127, so the decoded values are within half a step
    assert delta_of(got["x"]).tolist() == pytest.approx([10.0, -20.0, 5.0, 0.0], abs=20 / 127 / 2 + 1e-6)


def test_junk_data_replaces_only_the_attackers_shard():
    cfg = cfg_with("{clients: [x], kind: junk_data}")
    honest = {n: np.arange(100, dtype=np.uint16) % 50 for n in "abcdx"}
    data = SimpleNamespace(tokenizer=[0] * 512, client_tokens=dict(honest))
    apply_junk_data(cfg, data)
    for n in "abcd":
        assert data.client_tokens[n] is honest[n]
    junk = data.client_tokens["x"]
    assert len(junk) == 100 and junk.dtype == np.uint16 and junk.max() < 512 and junk.max() >= 50
    again = SimpleNamespace(tokenizer=[0] * 512, client_tokens=dict(honest))
    assert np.array_equal(apply_junk_data(cfg, again).client_tokens["x"], junk)  # seeded


@pytest.mark.parametrize("attack,message", [
    ("{clients: [zz], kind: scale}", "attack.clients: ['zz'] are not in federation.clients"),
    ("{clients: [x], kind: backdoor}", "attack.kind"),
    ("{clients: [x], kind: scale, factor: -1}", "attack.factor"),
    ("{clients: [x], kind: scale, extra: 1}", "attack.extra: unknown key"),
])
def test_bad_attack_sections_are_config_errors(attack, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        cfg_with(attack)


def test_refused_outside_simulation():
    refuse_attack(load_config(preset="smoke"), "skyfed server")  # no attack: fine
    cfg = cfg_with("{clients: [x], kind: sign_flip}")
    with pytest.raises(ConfigError, match=r"^attack: skyfed server refuses .*simulation only"):
        refuse_attack(cfg, "skyfed server")


def test_the_grpc_client_refuses_a_config_with_an_attack():
    from skyfed.runtime.grpc import skyfed_pb2 as pb
    from skyfed.runtime.grpc.client import _config_from

    ok = _config_from(pb.RegisterReply(config_yaml=dump_config(load_config(preset="smoke"))))
    assert isinstance(ok, ExperimentConfig) and not ok.attack.active
    bad = yaml.safe_load(dump_config(load_config(preset="smoke")))
    bad["attack"] = {"clients": ["aws"], "kind": "scale"}
    with pytest.raises(ConfigError, match="skyfed client refuses"):
        _config_from(pb.RegisterReply(config_yaml=yaml.safe_dump(bad)))
