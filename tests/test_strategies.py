"""Strategies with exact arithmetic on small tensors."""

import math

import pytest
import torch

from skyfed.errors import CheckpointError, ConfigError
from skyfed.federation.messages import Update
from skyfed.federation.strategies import STRATEGIES, build_strategy


def upd(client, delta, n=100, train_loss=1.0, holdout=None, staleness=0):
    return Update(client, 0, 0, {"w": torch.tensor(delta, dtype=torch.float32)}, n, train_loss, holdout, 0, staleness)


G = {"w": torch.tensor([1.0, -2.0, 0.5])}


def three_updates():
    return [
        upd("a", [0.3, -0.1, 0.2], n=100, holdout=2.0),
        upd("b", [-0.2, 0.4, 0.1], n=300, holdout=2.0),
        upd("c", [0.05, 0.05, -0.3], n=200, holdout=2.0),
    ]


def fedavg_expected(updates):
    total = sum(u.num_tokens for u in updates)
    mean = sum(u.delta["w"] * (u.num_tokens / total) for u in updates)
    return G["w"] - mean


# ---------------------------------------------------------------- registry and params


def test_registry_has_every_strategy_with_description_and_paper():
    expected = {"fedavg", "dynamic", "fedopt", "diloco", "fedavgm", "fedadam", "fedyogi", "fedadagrad",
                "fedprox", "fedasync", "fedbuff"}
    assert expected <= set(STRATEGIES)
    for name, cls in STRATEGIES.items():
        assert cls.name == name and cls.description and "20" in cls.paper
        assert "20" in (cls.__doc__ or ""), f"{name}'s class docstring cites no paper"
    assert STRATEGIES["fedasync"].asynchronous and STRATEGIES["fedbuff"].asynchronous
    assert not STRATEGIES["diloco"].asynchronous


@pytest.mark.parametrize("name,params,key", [
    ("fedopt", {"lr": -1}, "lr"),
    ("fedopt", {"optimizer": "lamb"}, "optimizer"),
    ("fedopt", {"momentum": 1.0}, "momentum"),
    ("fedopt", {"betas": [0.9]}, "betas"),
    ("fedopt", {"optimizer": "nesterov"}, "momentum"),
    ("diloco", {"optimizer": "adam"}, "optimizer"),
    ("dynamic", {"mapping": "linear"}, "mapping"),
    ("dynamic", {"temperature": 0}, "temperature"),
    ("dynamic", {"floor": "x"}, "floor"),
    ("dynamic", {"score": "server"}, "score"),  # no server validation set given
    ("fedprox", {"mu": -0.1}, "mu"),
    ("fedasync", {"alpha": 1.5}, "alpha"),
    ("fedasync", {"staleness": "exp"}, "staleness"),
    ("fedbuff", {"buffer_size": 0}, "buffer_size"),
    ("fedbuff", {"max_staleness": -1}, "max_staleness"),
    ("fedavg", {"lr": 1}, "lr"),
    ("fedbuff", {"evaluate_params": 1}, "evaluate_params"),
])
def test_bad_params_name_their_key(name, params, key):
    with pytest.raises(ConfigError, match=rf"^federation\.strategy\.params\.{key}: "):
        build_strategy(name, params)


def test_unknown_strategy():
    with pytest.raises(ConfigError, match="federation.strategy.name: unknown strategy 'nope'"):
        build_strategy("nope")


# ---------------------------------------------------------------- FedAvg and FedOpt


def test_fedopt_sgd_lr1_equals_fedavg():
    ups = three_updates()
    avg = build_strategy("fedavg").aggregate(G, ups, 0).params["w"]
    opt = build_strategy("fedopt", {"optimizer": "sgd", "lr": 1.0}).aggregate(G, ups, 0).params["w"]
    assert torch.allclose(avg, fedavg_expected(ups), atol=1e-6)
    assert torch.allclose(opt, avg, atol=1e-6)
    assert torch.equal(G["w"], torch.tensor([1.0, -2.0, 0.5]))  # never in place


def two_rounds(strategy):
    """Two server steps with different pseudo-gradients; returns (p1, p2, g1, g2)."""
    r1 = [upd("a", [0.2, -0.4, 0.1], n=1), upd("b", [0.4, 0.0, 0.3], n=1)]
    r2 = [upd("a", [-0.1, 0.2, 0.5], n=3), upd("b", [0.3, 0.2, -0.3], n=1)]
    g1 = (r1[0].delta["w"] + r1[1].delta["w"]) / 2
    g2 = (3 * r2[0].delta["w"] + r2[1].delta["w"]) / 4
    p1 = strategy.aggregate(G, r1, 0).params
    p2 = strategy.aggregate(p1, r2, 1).params
    return p1["w"], p2["w"], g1, g2


def test_nesterov_two_steps_match_hand_computation():
    lr, m = 0.7, 0.9
    p1, p2, g1, g2 = two_rounds(build_strategy("diloco"))
    b1 = g1
    e1 = G["w"] - lr * (g1 + m * b1)
    b2 = m * b1 + g2
    e2 = e1 - lr * (g2 + m * b2)
    assert torch.allclose(p1, e1, atol=1e-6)
    assert torch.allclose(p2, e2, atol=1e-6)


def test_fedavgm_momentum_two_steps():
    p1, p2, g1, g2 = two_rounds(build_strategy("fedavgm", {"lr": 1.0, "momentum": 0.5}))
    assert torch.allclose(p1, G["w"] - g1, atol=1e-6)
    assert torch.allclose(p2, p1 - (0.5 * g1 + g2), atol=1e-6)


def test_adam_two_steps_match_hand_computation():
    lr, (b1, b2), eps = 0.05, (0.9, 0.99), 1e-3
    p1, p2, g1, g2 = two_rounds(build_strategy("fedadam", {"lr": lr, "betas": [b1, b2], "eps": eps}))
    m = (1 - b1) * g1
    v = (1 - b2) * g1**2
    e1 = G["w"] - lr * (m / (1 - b1)) / ((v / (1 - b2)).sqrt() + eps)
    m = b1 * m + (1 - b1) * g2
    v = b2 * v + (1 - b2) * g2**2
    e2 = e1 - lr * (m / (1 - b1**2)) / ((v / (1 - b2**2)).sqrt() + eps)
    assert torch.allclose(p1, e1, atol=1e-6)
    assert torch.allclose(p2, e2, atol=1e-6)


def test_yogi_two_steps_match_reddi_algorithm():
    lr, (b1, b2), eps = 0.05, (0.9, 0.99), 1e-3
    p1, p2, g1, g2 = two_rounds(build_strategy("fedyogi", {"lr": lr, "betas": [b1, b2], "eps": eps}))
    m = (1 - b1) * g1
    v = torch.zeros(3) - (1 - b2) * g1**2 * torch.sign(torch.zeros(3) - g1**2)
    e1 = G["w"] - lr * m / (v.sqrt() + eps)
    m = b1 * m + (1 - b1) * g2
    v = v - (1 - b2) * g2**2 * torch.sign(v - g2**2)
    e2 = e1 - lr * m / (v.sqrt() + eps)
    assert torch.allclose(p1, e1, atol=1e-6)
    assert torch.allclose(p2, e2, atol=1e-6)


def test_adagrad_two_steps():
    lr, eps = 0.1, 1e-3
    p1, p2, g1, g2 = two_rounds(build_strategy("fedadagrad", {"lr": lr, "eps": eps}))
    s = g1**2
    e1 = G["w"] - lr * g1 / (s.sqrt() + eps)
    s = s + g2**2
    e2 = e1 - lr * g2 / (s.sqrt() + eps)
    assert torch.allclose(p1, e1, atol=1e-6) and torch.allclose(p2, e2, atol=1e-6)


@pytest.mark.parametrize("name,params", [("diloco", {}), ("fedadam", {"lr": 0.05}), ("fedyogi", {"lr": 0.05}),
                                         ("fedadagrad", {"lr": 0.05})])
def test_fedopt_state_dict_round_trip_is_exact(name, params):
    a = build_strategy(name, params)
    r1 = [upd("a", [0.2, -0.4, 0.1]), upd("b", [0.4, 0.0, 0.3])]
    r2 = [upd("a", [-0.1, 0.2, 0.5]), upd("b", [0.3, 0.2, -0.3])]
    p1 = a.aggregate(G, r1, 0).params
    state = a.state_dict()
    expected = a.aggregate(p1, r2, 1).params["w"]
    b = build_strategy(name, params)
    b.load_state_dict(state)  # before the first aggregate: applied when the server tensors exist
    got = b.aggregate(p1, r2, 1).params["w"]
    assert torch.equal(got, expected)
    c = build_strategy(name, params)
    c.load_state_dict(b.state_dict())  # a not-yet-built strategy passes its pending state on
    assert c.state_dict()["state"]["state"].keys() == b.state_dict()["state"]["state"].keys()


def test_fedopt_state_of_another_optimizer_is_refused():
    a = build_strategy("fedadam")
    a.aggregate(G, three_updates(), 0)
    with pytest.raises(CheckpointError, match="'adam'.*'nesterov'"):
        build_strategy("diloco").load_state_dict(a.state_dict())


# ---------------------------------------------------------------- dynamic weighting


def test_dynamic_equal_losses_equals_token_weighted_fedavg():
    ups = three_updates()
    out = build_strategy("dynamic", {"floor": 0.0}).aggregate(G, ups, 0)
    assert torch.allclose(out.params["w"], fedavg_expected(ups), atol=1e-6)
    assert out.metrics["weights"] == pytest.approx({"a": 1 / 6, "b": 3 / 6, "c": 2 / 6})
    inv = build_strategy("dynamic", {"mapping": "inverse", "power": 3, "floor": 0.0}).aggregate(G, ups, 0)
    assert torch.allclose(inv.params["w"], fedavg_expected(ups), atol=1e-6)


def test_dynamic_lower_loss_gets_larger_weight():
    ups = [upd("good", [1.0, 0, 0], n=100, holdout=2.0), upd("bad", [0, 1.0, 0], n=100, holdout=4.0)]
    out = build_strategy("dynamic", {"temperature": 1.0, "floor": 0.0}).aggregate(G, ups, 0)
    w = out.metrics["weights"]
    assert w["good"] == pytest.approx(1 / (1 + math.exp(-2.0)))
    assert w["good"] > 0.85 and w["bad"] < 0.15
    assert torch.allclose(out.params["w"], G["w"] - torch.tensor([w["good"], w["bad"], 0.0]), atol=1e-6)
    assert out.metrics["scores"] == {"good": 2.0, "bad": 4.0}
    inv = build_strategy("dynamic", {"mapping": "inverse", "power": 2, "floor": 0.0, "use_tokens": False})
    assert inv.aggregate(G, ups, 0).metrics["weights"] == pytest.approx({"good": 0.8, "bad": 0.2})


def test_dynamic_floor_keeps_every_cloud_heard():
    ups = [upd("a", [1.0, 0, 0], holdout=1.0), upd("b", [0, 1.0, 0], holdout=9.0), upd("c", [0, 0, 1.0], holdout=9.5)]
    w = build_strategy("dynamic", {"temperature": 0.1, "floor": 0.1}).aggregate(G, ups, 0).metrics["weights"]
    assert w["b"] == pytest.approx(0.1) and w["c"] == pytest.approx(0.1) and w["a"] == pytest.approx(0.8)
    w0 = build_strategy("dynamic", {"temperature": 0.1, "floor": 0.0}).aggregate(G, ups, 0).metrics["weights"]
    assert w0["b"] < 1e-30
    # a floor above 1/n gives every client the same share
    w = build_strategy("dynamic", {"floor": 0.9}).aggregate(G, ups, 0).metrics["weights"]
    assert list(w.values()) == pytest.approx([1 / 3] * 3)


def test_dynamic_non_finite_loss_gets_only_the_floor():
    ups = [upd("a", [1.0, 0, 0], holdout=2.0), upd("b", [0, 1.0, 0], holdout=float("nan"))]
    w = build_strategy("dynamic", {"floor": 0.05}).aggregate(G, ups, 0).metrics["weights"]
    assert w == pytest.approx({"a": 0.95, "b": 0.05})


def test_dynamic_server_score_uses_the_given_evaluator():
    seen = []

    def evaluate_params(params):  # loss = distance of the candidate model from the origin
        seen.append(params["w"].clone())
        return float(params["w"].abs().sum())

    ups = [upd("near", [1.0, -2.0, 0.0]), upd("far", [-1.0, 2.0, 0.0])]  # candidates [0,0,.5] and [2,-4,.5]
    s = build_strategy("dynamic", {"score": "server", "temperature": 1.0, "floor": 0.0}, evaluate_params=evaluate_params)
    assert s.client_options(0) == {}
    out = s.aggregate(G, ups, 0)
    assert torch.allclose(seen[0], torch.tensor([0.0, 0.0, 0.5]))
    assert out.metrics["scores"] == pytest.approx({"near": 0.5, "far": 6.5})
    assert out.metrics["weights"]["near"] == pytest.approx(1 / (1 + math.exp(-6.0)))


def test_dynamic_asks_clients_for_a_holdout_slice():
    assert build_strategy("dynamic", {"holdout_tokens": 512}).client_options(3) == {"holdout_tokens": 512}


# ---------------------------------------------------------------- FedProx


def test_fedprox_is_fedavg_plus_mu_option():
    ups = three_updates()
    s = build_strategy("fedprox", {"mu": 0.05})
    assert s.client_options(0) == {"prox_mu": 0.05}
    assert torch.allclose(s.aggregate(G, ups, 0).params["w"], fedavg_expected(ups), atol=1e-6)


# ---------------------------------------------------------------- asynchronous


def test_fedasync_alpha1_staleness0_replaces_the_model():
    s = build_strategy("fedasync", {"alpha": 1.0})
    u = upd("a", [0.3, -0.1, 0.2], staleness=0)
    out = s.on_update(G, u, G)
    assert torch.allclose(out.params["w"], G["w"] - u.delta["w"], atol=1e-7)


def test_fedasync_mixes_with_staleness_weight_and_old_base():
    base = {"w": torch.tensor([0.0, 0.0, 0.0])}
    u = upd("a", [1.0, -1.0, 2.0], staleness=3)  # client model = base - delta = [-1, 1, -2]
    s = build_strategy("fedasync", {"alpha": 0.8, "staleness": "polynomial", "a": 0.5})
    out = s.on_update(G, u, base)
    alpha_t = 0.8 * 4**-0.5
    assert out.metrics["alpha"] == {"a": pytest.approx(alpha_t)}
    assert torch.allclose(out.params["w"], (1 - alpha_t) * G["w"] + alpha_t * torch.tensor([-1.0, 1.0, -2.0]), atol=1e-6)
    d = build_strategy("fedasync", {"alpha": 0.8, "mix": "delta", "staleness": "hinge", "a": 1.0, "b": 1})
    out = d.on_update(G, u, None)  # hinge: 1/(1*(3-1)+1) = 1/3
    assert torch.allclose(out.params["w"], G["w"] - 0.8 / 3 * u.delta["w"], atol=1e-6)
    assert not d.needs_base_params and s.needs_base_params


def test_fedbuff_k_equals_clients_no_staleness_equals_fedavg():
    ups = three_updates()
    s = build_strategy("fedbuff", {"buffer_size": 3})
    assert s.on_update(G, ups[0], None) is None
    assert s.on_update(G, ups[1], None) is None
    out = s.on_update(G, ups[2], None)
    assert torch.allclose(out.params["w"], fedavg_expected(ups), atol=1e-6)
    assert s.buffer == []


def test_fedbuff_stale_updates_move_the_model_less_and_server_lr():
    a, b = upd("a", [1.0, 0, 0], n=1, staleness=0), upd("b", [0, 1.0, 0], n=1, staleness=3)
    s = build_strategy("fedbuff", {"buffer_size": 2, "server_lr": 2.0, "staleness": "polynomial", "a": 0.5})
    s.on_update(G, a, None)
    out = s.on_update(G, b, None)
    step = torch.tensor([0.5, 0.5 * 0.5, 0.0])  # n_i s_i / sum n: 1/2 and (1/2)(4^-0.5)
    assert torch.allclose(out.params["w"], G["w"] - 2.0 * step, atol=1e-6)


def test_fedbuff_state_round_trip_and_flush():
    s = build_strategy("fedbuff", {"buffer_size": 3})
    ups = three_updates()
    s.on_update(G, ups[0], None)
    s.on_update(G, ups[1], None)
    state = s.state_dict()
    t = build_strategy("fedbuff", {"buffer_size": 3})
    t.load_state_dict(state)
    assert torch.equal(t.on_update(G, ups[2], None).params["w"], s.on_update(G, ups[2], None).params["w"])
    assert t.flush(G) is None
    t.on_update(G, ups[0], None)
    flushed = t.flush(G)
    assert torch.allclose(flushed.params["w"], G["w"] - ups[0].delta["w"], atol=1e-7)


def test_async_strategy_used_synchronously_applies_all_updates():
    ups = three_updates()
    out = build_strategy("fedbuff", {"buffer_size": 10}).aggregate(G, ups, 0)  # flushed partial buffer
    assert torch.allclose(out.params["w"], fedavg_expected(ups), atol=1e-6)


def test_fedavgm_default_lr_is_one_minus_momentum():
    s = build_strategy("fedavgm", {"momentum": 0.8})
    assert s.lr == pytest.approx(0.2) and s.momentum == 0.8
    with pytest.raises(ConfigError, match=r"params\.momentum: must be < 1"):
        build_strategy("fedavgm", {"momentum": 1.0})


def test_dynamic_client_without_holdout_gets_a_neutral_score_not_its_train_loss():
    ups = [upd("tiny", [1.0, 0, 0], train_loss=0.5, holdout=None),  # memorised a tiny shard
           upd("b", [0, 1.0, 0], holdout=5.0), upd("c", [0, 0, 1.0], holdout=7.0)]
    out = build_strategy("dynamic", {"temperature": 1.0, "floor": 0.0}).aggregate(G, ups, 0)
    assert out.metrics["scores"] == {"tiny": 6.0, "b": 5.0, "c": 7.0}
    assert out.metrics["weights"]["b"] > out.metrics["weights"]["tiny"] > out.metrics["weights"]["c"]
    # nobody has a holdout: training losses for all
    ups = [upd("a", [1.0, 0, 0], train_loss=2.0), upd("b", [0, 1.0, 0], train_loss=3.0)]
    assert build_strategy("dynamic", {"floor": 0.0}).aggregate(G, ups, 0).metrics["scores"] == {"a": 2.0, "b": 3.0}
