"""Cloud profiles, the network time model, outages, the egress bill and the simulated clock."""

from __future__ import annotations

import pytest

from skyfed.clouds import BUILTIN_PROFILES, CloudNetwork, CloudProfile, network_from_config, parse_outage, resolve_profiles
from skyfed.config import load_config
from skyfed.errors import ConfigError
from skyfed.federation.messages import ClientResult, TrainTask
from skyfed.runtime.inprocess import InProcessTransport, SimulatedTransport


def net(**kw) -> CloudNetwork:
    profiles = {
        "fast": CloudProfile("fast", tokens_per_s=1000, uplink_mbps=8, downlink_mbps=16, rtt_ms=100, egress_usd_per_gb=0.1),
        "slow": CloudProfile("slow", tokens_per_s=250, uplink_mbps=8, downlink_mbps=16, rtt_ms=100, egress_usd_per_gb=0.2),
        "hub": CloudProfile("hub", uplink_mbps=1000, downlink_mbps=1000, egress_usd_per_gb=1.0),
    }
    args = dict(client_cloud={"a": "fast", "b": "slow", "h": "hub"}, profiles=profiles, server_cloud="hub")
    args.update(kw)
    return CloudNetwork(**args)


class FakeClient:
    """Answers a task with `up` bytes of payload and `tokens` trained tokens."""

    def __init__(self, name: str, tokens: int = 1000, up: int = 1_000_000):
        self.name, self.tokens, self.up = name, tokens, up

    def handle(self, task: TrainTask) -> ClientResult:
        return ClientResult(self.name, task.round, task.version, b"u" * self.up, num_tokens=self.tokens)


def task(r: int = 0, nbytes: int = 2_000_000) -> TrainTask:
    return TrainTask(r, 0, b"m" * nbytes, 1)


def test_time_model_numbers():
    n = net()
    # 2 MB down over min(1000, 16) Mbit/s = 1 s, plus half of the 100 ms RTT
    assert n.download_s("a", 2_000_000) == pytest.approx(1.05)
    assert n.upload_s("a", 1_000_000) == pytest.approx(1.05)  # 1 MB at 8 Mbit/s
    assert n.compute_s("a", 1000) == pytest.approx(1.0)
    assert n.compute_s("b", 1000) == pytest.approx(4.0)


def test_throughput_from_speed_and_reference():
    p = {"x": CloudProfile("x", speed=0.5)}
    n = CloudNetwork({"c": "x"}, p, "x", num_params=1000, reference_flops=6e6)
    assert n.throughput("c") == pytest.approx(500.0)  # 0.5 * 6e6 / (6 * 1000)
    n = CloudNetwork({"c": "x"}, p, "x", reference_tokens_per_s=800)
    assert n.throughput("c") == pytest.approx(400.0)


def test_egress_bill_and_same_cloud_rule():
    n = net()
    n.bill_download("a", 3 * 10**9)  # the server (hub) pays for the model it sends
    n.bill_upload("a", 10**9)
    n.bill_upload("b", 2 * 10**9)
    n.bill_upload("h", 10**9)  # a client in the server's cloud: same region, free
    n.bill_download("h", 10**9)
    cost = n.egress_cost_usd()
    assert cost == {"hub": pytest.approx(3.0), "fast": pytest.approx(0.1), "slow": pytest.approx(0.4), "total": pytest.approx(3.5)}
    n2 = net(same_cloud_free=False)
    n2.bill_upload("h", 10**9)
    assert n2.egress_cost_usd()["hub"] == pytest.approx(1.0)


def test_profiles_overrides_and_errors():
    p = resolve_profiles({"gcp": {"rtt_ms": 5}, "lab": {"base": "onprem", "speed": 2.0}, "bare": {}})
    assert p["gcp"].rtt_ms == 5 and p["gcp"].egress_usd_per_gb == BUILTIN_PROFILES["gcp"].egress_usd_per_gb
    assert p["lab"].speed == 2.0 and p["lab"].uplink_mbps == BUILTIN_PROFILES["onprem"].uplink_mbps
    assert p["bare"] == CloudProfile("bare")
    with pytest.raises(ConfigError, match="clouds.profiles.x.base: unknown built-in profile 'nope'"):
        resolve_profiles({"x": {"base": "nope"}})
    cfg = load_config(overrides=["federation.clients=[{name: a, cloud: mars}]"])
    with pytest.raises(ConfigError, match="unknown cloud 'mars'"):
        network_from_config(cfg, 10)
    with pytest.raises(ConfigError, match="clouds.profiles.gcp.speed"):
        load_config(overrides=["clouds.profiles.gcp.speed=-1"])


def test_builtin_prices_are_the_cited_list_prices():
    assert {k: p.egress_usd_per_gb for k, p in BUILTIN_PROFILES.items()} == {
        "aws": 0.09, "gcp": 0.12, "azure": 0.087, "onprem": 0.0}


def test_outage_forms():
    assert parse_outage("gcp:5-7").__dict__ == {"target": "gcp", "first": 5, "last": 7}
    assert parse_outage("gcp:3").__dict__ == {"target": "gcp", "first": 3, "last": 3}
    assert parse_outage({"target": "aws", "rounds": [1, 2]}).__dict__ == {"target": "aws", "first": 1, "last": 2}
    with pytest.raises(ConfigError, match="'gcp 5' is not TARGET:FIRST"):
        parse_outage("gcp 5")
    with pytest.raises(ConfigError, match="the last round is before the first"):
        parse_outage("gcp:7-5")
    with pytest.raises(ConfigError, match="'moon' is neither a client nor a cloud"):
        net(outages=[parse_outage("moon:1")])


def test_scripted_and_random_unavailability():
    n = net(outages=[parse_outage("slow:2-3")])
    assert [n.unavailable_reason("b", r) is not None for r in range(5)] == [False, False, True, True, False]
    assert all(n.unavailable_reason("a", r) is None for r in range(5))
    p = dict(net().profiles)
    p["fast"] = CloudProfile("fast", unavailability=0.3)
    draws = [CloudNetwork({"a": "fast"}, p, "fast", seed=1).unavailable_reason("a", r) is not None for r in range(400)]
    again = [CloudNetwork({"a": "fast"}, p, "fast", seed=1).unavailable_reason("a", r) is not None for r in range(400)]
    assert draws == again  # deterministic for a seed
    assert 0.22 < sum(draws) / 400 < 0.38


def test_clock_orders_arrivals_and_honours_timeouts():
    n = net()
    t = SimulatedTransport([FakeClient("a"), FakeClient("b")], n)
    t.send("b", task())  # 1.05 + 4 + 1.05 = 6.1 s
    t.send("a", task())  # 1.05 + 1 + 1.05 = 3.1 s
    assert t.now() == 0.0
    first = t.receive(None)
    assert first.client == "a" and t.now() == pytest.approx(3.1)
    assert first.meta["timing"]["compute_s"] == pytest.approx(1.0)
    assert t.receive(1.0) is None and t.now() == pytest.approx(4.1)  # nothing within 1 s: clock moves 1 s
    second = t.receive(10.0)
    assert second.client == "b" and t.now() == pytest.approx(6.1)
    assert t.receive(None) is None
    t.elapse(0.5)
    assert t.now() == pytest.approx(6.6)


def test_busy_client_starts_its_next_task_when_free():
    t = SimulatedTransport([FakeClient("b")], net())
    t.send("b", task(0))
    t.send("b", task(1))  # queued behind the first: starts at 6.1
    r0, r1 = t.receive(None), t.receive(None)
    assert (r0.round, r1.round) == (0, 1)
    assert r1.meta["timing"]["start_s"] == pytest.approx(6.1)
    assert t.now() == pytest.approx(12.2)


def test_without_network_results_arrive_in_send_order_at_time_zero():
    t = InProcessTransport([FakeClient("a"), FakeClient("b")])
    t.send("b", task())
    t.send("a", task())
    assert [t.receive().client, t.receive().client] == ["b", "a"]
    assert t.now() == 0.0 and t.receive() is None


def test_default_experiment_resolves_its_clouds():
    n = network_from_config(load_config(), num_params=1_000_000)
    assert n.client_cloud == {"aws": "aws", "gcp": "gcp", "azure": "azure"} and n.server_cloud == "aws"


def test_summary_table_shows_simulated_time_and_egress(tmp_path):
    from rich.console import Console

    from skyfed.ui import print_summary

    console = Console(record=True, width=200)
    final = {"val_loss": 5.0, "val_ppl": 148.4, "val_token_acc": 0.1, "val_tokens": 100}
    summary = {
        "mode": "federated", "rounds": 2, "final": final, "unigram_ppl": 200.0, "ppl_vs_unigram": 0.74,
        "total": {"bytes_up": 10, "bytes_down": 10}, "wall_time_s": 1.0,
        "sim_time_s": 754.0, "egress_cost_usd": {"aws": 1.25, "gcp": 0.5, "total": 1.75},
    }
    print_summary(console, tmp_path, summary)
    text = console.export_text()
    assert "simulated time" in text and "12.6 min" in text
    assert "$1.7500 (aws $1.2500, gcp $0.5000)" in text


def test_calibration_counts_the_tokens_it_timed():
    from skyfed.runtime.calibrate import measure_tokens_per_s

    cfg = load_config(preset="smoke")
    m = measure_tokens_per_s(cfg, steps=2, warmup=1)
    assert m["tokens_per_s"] * m["seconds"] == pytest.approx(2 * cfg.train.batch_size * cfg.train.seq_len)


def test_transport_state_restores_the_clock_the_bill_and_results_in_flight():
    from skyfed.runtime.cloud_metrics import CloudAccounting

    class StatelessClient(FakeClient):
        def state_dict(self):
            return {}

        def load_state_dict(self, state):
            assert state == {}

    n = net()
    t = SimulatedTransport([StatelessClient("a")], n)
    t.send("a", task(0))
    t.receive()
    t.send("a", task(1))  # still travelling when the checkpoint is taken
    state = t.state_dict()
    n2 = net()
    t2 = SimulatedTransport([StatelessClient("a")], n2)
    t2.load_state_dict(state)
    assert t2.now() == t.now() and n2.egress_bytes == n.egress_bytes
    later, restored = t.receive(), t2.receive()
    assert restored.round == later.round == 1 and t2.now() == t.now()
    assert CloudAccounting(t2, n2).summary()["egress_cost_usd"] == CloudAccounting(t, n).summary()["egress_cost_usd"]


def test_fixed_aggregation_time_makes_the_round_clock_exact():
    from types import SimpleNamespace

    from skyfed.runtime.cloud_metrics import CloudAccounting

    n = net()
    t = SimulatedTransport([FakeClient("a"), FakeClient("b")], n)
    acc = CloudAccounting(t, n, aggregation_s=0.25)
    acc.round_start(0)
    t.send("a", task())
    t.send("b", task())
    got = [t.receive(None), t.receive(None)]
    out = acc.round_end(0, {"aggregate_s": 123.0}, SimpleNamespace(meta={r.client: r.meta for r in got}))
    assert out["round_sim_s"] == pytest.approx(6.1 + 0.25)  # slowest client b + the fixed aggregation
    assert out["slowest_client"] == "b" and set(out["client_timing"]) == {"a", "b"}


def test_clients_sharing_a_cloud_share_its_bill_and_profile():
    n = net(client_cloud={"a1": "fast", "a2": "fast", "b": "slow"})
    assert n.clouds() == ["hub", "fast", "slow"]
    n.bill_upload("a1", 10**9)
    n.bill_upload("a2", 2 * 10**9)
    assert n.egress_cost_usd()["fast"] == pytest.approx(0.3)
    assert n.compute_s("a1", 500) == n.compute_s("a2", 500) == pytest.approx(0.5)
