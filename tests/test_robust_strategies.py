"""The robust strategies, norm bounding, the loss filter and the async share cap, with exact numbers."""

import math

import pytest
import torch

from skyfed.compression.wire import spec_of
from skyfed.errors import ConfigError
from skyfed.federation.messages import Update
from skyfed.federation.strategies import STRATEGIES, build_strategy, needs_server_eval, yaml_params
from skyfed.federation.strategies.mean import RunningMean
from skyfed.federation.strategies.robust.norm_bound import NormBounded, NormBoundedAsync, NormBoundedMean

G = {"w": torch.tensor([1.0, -2.0])}
ROBUST = ["median", "trimmed_mean", "krum", "multikrum", "centered_clip", "loss_filter"]


def upd(client, delta, n=100):
    return Update(client, 0, 0, {"w": torch.tensor(delta, dtype=torch.float32)}, n, 1.0)


def five(bad=(100.0, -100.0)):
    """Four honest updates near (1, 1) and one far away."""
    return [upd("a", [1.0, 1.0]), upd("b", [1.2, 0.8]), upd("c", [0.8, 1.2]), upd("d", [1.1, 1.0]), upd("x", list(bad), n=10**9)]


def test_registered_with_paper_and_listed_params():
    for name in ROBUST:
        cls = STRATEGIES[name]
        arxiv = cls.paper.split("arXiv:")[-1].rstrip(")")
        assert "arXiv:" in cls.paper and arxiv in cls.__doc__
        assert not cls.asynchronous
    assert yaml_params(STRATEGIES["trimmed_mean"]) == ["beta", "server_lr"]
    assert yaml_params(STRATEGIES["krum"]) == ["f", "server_lr"]
    assert yaml_params(STRATEGIES["multikrum"]) == ["f", "m", "server_lr"]
    assert yaml_params(STRATEGIES["centered_clip"]) == ["tau", "iterations", "server_lr"]
    assert yaml_params(STRATEGIES["loss_filter"]) == ["k", "min_margin", "two_sided", "server_tokens"]
    assert "max_client_share" in yaml_params(STRATEGIES["fedasync"]) and "max_staleness" in yaml_params(STRATEGIES["fedbuff"])


@pytest.mark.parametrize("name,params,message", [
    ("trimmed_mean", {"beta": 0.5}, "federation.strategy.params.beta: must be <= 0.49"),
    ("krum", {"f": -1}, "federation.strategy.params.f: must be >= 0"),
    ("multikrum", {"m": 0}, "federation.strategy.params.m: must be >= 1"),
    ("krum", {"m": 2}, "federation.strategy.params.m: unknown parameter for 'krum'"),
    ("centered_clip", {"tau": 0}, "federation.strategy.params.tau: must be > 0"),
    ("centered_clip", {"iterations": 1.5}, "federation.strategy.params.iterations: expected an integer"),
    ("median", {"server_lr": "big"}, "federation.strategy.params.server_lr: expected a number"),
    ("fedbuff", {"max_client_share": 1.5}, "federation.strategy.params.max_client_share: must be <= 1"),
    ("fedasync", {"share_window": 0}, "federation.strategy.params.share_window: must be >= 1"),
])
def test_bad_params_name_their_key(name, params, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.").replace("(", r"\(")):
        build_strategy(name, params)


def test_median_and_trimmed_mean_ignore_the_outlier_and_the_token_claim():
    out = build_strategy("median").aggregate(G, five(), 0)
    assert out.params["w"].tolist() == pytest.approx([1.0 - 1.1, -2.0 - 1.0])  # medians 1.1 and 1.0
    tm = build_strategy("trimmed_mean", {"beta": 0.2}).aggregate(G, five(), 0)
    # per coordinate drop min and max of 5: w0 sorted [0.8, 1, 1.1, 1.2, 100] -> mean(1, 1.1, 1.2) = 1.1
    #                                       w1 sorted [-100, .8, 1, 1, 1.2]  -> mean(.8, 1, 1) = 0.9333
    assert tm.params["w"].tolist() == pytest.approx([1.0 - 1.1, -2.0 - 2.8 / 3])
    half = build_strategy("median", {"server_lr": 0.5}).aggregate(G, five(), 0)
    assert half.params["w"].tolist() == pytest.approx([1.0 - 0.55, -2.5])


def test_krum_and_multikrum_select_by_score():
    out = build_strategy("krum", {"f": 1}).aggregate(G, five(), 0)
    sel = out.metrics["robust"]["selected"]
    assert len(sel) == 1 and sel[0] != "x"
    # scores with 2 nearest neighbours: d (1.1, 1.0) is closest to a and b/c
    assert sel == ["d"] and out.params["w"].tolist() == pytest.approx([1.0 - 1.1, -3.0])
    mk = build_strategy("multikrum", {"f": 1}).aggregate(G, five(), 0)  # m = n - f = 4: every honest one
    assert mk.metrics["robust"]["selected"] == ["a", "b", "c", "d"]
    assert mk.params["w"].tolist() == pytest.approx([1.0 - 1.025, -2.0 - 1.0])
    assert mk.metrics["weights"] == {"a": 0.25, "b": 0.25, "c": 0.25, "d": 0.25, "x": 0.0}
    two = build_strategy("multikrum", {"f": 1, "m": 2}).aggregate(G, five(), 0)
    assert len(two.metrics["robust"]["selected"]) == 2


def test_krum_with_too_few_updates_still_aggregates():
    out = build_strategy("krum", {"f": 1}).aggregate(G, [upd("a", [1.0, 0.0]), upd("b", [3.0, 0.0])], 0)
    assert out.params["w"].tolist() == pytest.approx([0.0, -2.0])  # tie: the first


def test_centered_clip_bounds_the_outlier_and_keeps_history():
    s = build_strategy("centered_clip", {"tau": 0.5, "iterations": 1})
    out = s.aggregate(G, five(), 0)
    v = G["w"] - out.params["w"]
    # from centre 0: honest norms ~1.4 are clipped to 0.5 too, so v = mean of five vectors of norm 0.5
    assert float(v.norm()) <= 0.5 + 1e-6
    assert float(v[0]) > 0 and float(v[1]) > 0  # the outlier (100, -100) does not flip the direction
    assert s.state_dict()["center"]["w"].tolist() == pytest.approx(v.tolist())
    fresh = build_strategy("centered_clip", {"tau": 0.5, "iterations": 1})
    fresh.load_state_dict(s.state_dict())
    torch.testing.assert_close(fresh.aggregate(G, five(), 1).params["w"], s.aggregate(G, five(), 1).params["w"])
    adaptive = build_strategy("centered_clip").aggregate(G, five(), 0)
    assert float((G["w"] - adaptive.params["w"] - torch.tensor([1.0, 1.0])).norm()) < 0.35


# ---------------------------------------------------------------- norm bound


def test_norm_bound_wraps_each_kind_and_clips_before_the_strategy():
    fedavg = build_strategy("fedavg", norm_bound=1.0)
    assert isinstance(fedavg, NormBoundedMean) and fedavg.name == "fedavg"
    assert isinstance(build_strategy("fedbuff", norm_bound=1.0), NormBoundedAsync)
    assert isinstance(build_strategy("median", norm_bound=1.0), NormBounded)
    assert not isinstance(build_strategy("fedavg"), NormBoundedMean)
    ups = [upd("a", [0.3, 0.4], n=1), upd("x", [300.0, 400.0], n=1)]  # norms 0.5 and 500
    # streaming (fold) and the list path give the same: x is scaled to (0.6, 0.8)
    running = RunningMean(spec_of(G))
    for u in ups:
        fedavg.fold(running, u)
    streamed = fedavg.finish(G, running, 0)
    listed = build_strategy("fedavg", norm_bound=1.0).aggregate(G, ups, 0)
    for out in (streamed, listed):
        assert out.params["w"].tolist() == pytest.approx([1.0 - 0.45, -2.0 - 0.6])
        assert out.metrics["norm_bound"] == {"bound": 1.0, "clipped": {"x": pytest.approx(500.0)},
                                             "norms": {"a": pytest.approx(0.5), "x": pytest.approx(500.0)}}
    assert ups[1].delta["w"].tolist() == [300.0, 400.0]  # the update itself is not modified


def test_norm_bound_on_async_on_update_and_median():
    s = build_strategy("fedasync", {"alpha": 1.0, "staleness": "constant", "mix": "delta"}, norm_bound=0.5)
    out = s.on_update(G, upd("x", [30.0, 40.0]), None)
    assert out.params["w"].tolist() == pytest.approx([1.0 - 0.3, -2.0 - 0.4])
    assert s.max_staleness is None and s.needs_base_params is False
    b = build_strategy("fedbuff", {"max_staleness": 3}, norm_bound=0.5)
    assert b.max_staleness == 3
    m = build_strategy("median", norm_bound=0.5).aggregate(G, [upd("a", [3.0, 4.0]), upd("b", [0.0, 0.1]), upd("c", [0.0, 0.2])], 0)
    assert m.params["w"].tolist() == pytest.approx([1.0, -2.2])  # medians of (0.3, 0, 0) and (0.4, 0.1, 0.2)
    with pytest.raises(ConfigError, match="norm_bound: must be a positive number"):
        build_strategy("fedavg", norm_bound=-1)


def test_norm_bound_is_a_config_field():
    from skyfed.config import load_config

    cfg = load_config(preset="smoke", overrides=["federation.strategy.norm_bound=0.5"])
    assert cfg.federation.strategy.norm_bound == 0.5
    with pytest.raises(ConfigError, match="federation.strategy.norm_bound"):
        load_config(preset="smoke", overrides=["federation.strategy.norm_bound=0"])


# ---------------------------------------------------------------- loss filter


def test_loss_filter_drops_the_outlier_and_fedavgs_the_rest():
    def evaluate_params(params):  # loss = distance of the candidate model from (0, -3)
        return float((params["w"] - torch.tensor([0.0, -3.0])).norm())

    s = build_strategy("loss_filter", {"k": 3.0}, evaluate_params=evaluate_params)
    ups = [upd("a", [1.0, 1.0], n=100), upd("b", [1.0, 1.0], n=300), upd("x", [-50.0, 0.0], n=10**6)]
    out = s.aggregate(G, ups, 0)
    assert out.metrics["loss_filter"]["dropped"] == ["x"]
    assert out.params["w"].tolist() == pytest.approx([0.0, -3.0])
    assert out.metrics["weights"] == {"a": 0.25, "b": 0.75, "x": 0.0}
    assert out.metrics["scores"]["x"] == pytest.approx(math.sqrt(51**2 + 1))  # candidate (51, -2)
    # two-sided: a candidate far better than the rest is dropped too, unless two_sided is false
    low = [upd("a", [0.0, 0.0]), upd("b", [0.0, 0.0]), upd("c", [0.1, 0.0]), upd("y", [1.0, 1.0])]
    assert s.aggregate(G, low, 0).metrics["loss_filter"]["dropped"] == ["y"]
    one = build_strategy("loss_filter", {"two_sided": False}, evaluate_params=evaluate_params)
    assert one.aggregate(G, low, 0).metrics["loss_filter"]["dropped"] == []
    nan = build_strategy("loss_filter", evaluate_params=lambda p: math.nan if p["w"][0] > 10 else 1.0)
    assert nan.aggregate(G, [upd("a", [0.0, 0.0]), upd("x", [-50.0, 0.0])], 0).metrics["loss_filter"]["dropped"] == ["x"]
    with pytest.raises(ConfigError, match="loss_filter' needs a server-side validation set"):
        build_strategy("loss_filter")
    assert needs_server_eval("loss_filter", {}) and not needs_server_eval("median", {})


# ---------------------------------------------------------------- async share cap


def test_share_cap_drops_a_flooding_client_in_fedasync_and_fedbuff():
    s = build_strategy("fedasync", {"alpha": 1.0, "staleness": "constant", "mix": "delta",
                                    "max_client_share": 0.4, "share_window": 5})  # cap 2 of the last 5
    params, taken = G, []
    for client in ["f", "f", "f", "a", "f", "b", "f", "f"]:
        out = s.on_update(params, upd(client, [1.0, 0.0]), None)
        taken.append(out is not None)
        if out is not None:
            params = out.params
    # window of arrivals (client, accepted): f f [f dropped] a [f dropped: f,f in window] b
    # then f: window [f, f-, a, f-, b] has one accepted f -> accepted; next f: window [f-, a, f-, b, f] -> accepted
    assert taken == [True, True, False, True, False, True, True, True]
    assert params["w"].tolist() == pytest.approx([1.0 - 6.0, -2.0])  # 6 accepted updates of (1, 0)
    state = s.state_dict()
    t = build_strategy("fedasync", {"max_client_share": 0.4, "share_window": 5})
    t.load_state_dict(state)
    assert list(t.share.window) == list(s.share.window)
    b = build_strategy("fedbuff", {"buffer_size": 2, "max_client_share": 0.5, "share_window": 2})  # cap 1 of 2
    assert b.on_update(G, upd("f", [1.0, 0.0]), None) is None  # buffered
    assert b.on_update(G, upd("f", [1.0, 0.0]), None) is None  # dropped: f already has 1 of the last 2
    out = b.on_update(G, upd("a", [3.0, 0.0]), None)
    assert out.params["w"].tolist() == pytest.approx([1.0 - 2.0 / math.sqrt(1), -2.0])
    assert out.metrics["share_dropped"] == {"f": 1}
