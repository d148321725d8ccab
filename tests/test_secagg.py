"""Secure aggregation (Bonawitz et al. 2017, SecAgg+): exact sums, dropouts, refusals,
the safety rule and forged shares, on tiny vectors with real cryptography."""

from __future__ import annotations

import json

import numpy as np
import pytest

from skyfed.errors import SecAggError
from skyfed.security.secagg import FixedPoint, SecAggClient, SecAggParams, SecAggServer
from skyfed.security.secagg import crypto, shamir


def setup(n: int, dim: int = 257, bits: int = 32, **kw):
    params = SecAggParams(bits, dim, **kw)
    server = SecAggServer(params, round=3)
    clients = {f"c{i}": SecAggClient(f"c{i}", params) for i in range(n)}
    for name, c in clients.items():
        server.receive_keys(name, c.advertise())
    roster = server.roster()
    for name, c in clients.items():
        server.receive_shares(name, c.share_keys(roster))
    server.close_sharing()
    return server, clients


def inputs(names, dim, bits=32, n=5, seed=0):
    fp = FixedPoint(bits, 1.0, n)
    rng = np.random.default_rng(seed)
    return fp, {name: fp.quantize(rng.uniform(-1, 1, dim)) for name in names}


def run(server, clients, q, fp, drop=(), answer=None):
    for name, c in clients.items():
        masked = c.mask(server.bundle_for(name), fp.to_ring(q[name]))
        if name not in drop:
            server.add_masked(name, masked)
    request = server.unmask_request()
    for name in request["survivors"] if answer is None else answer:
        server.receive_unmask(name, clients[name].unmask(request))
    return server.finish()


@pytest.mark.parametrize("bits", [16, 32])
def test_sum_of_five_masked_vectors_is_the_exact_fixed_point_sum(bits):
    server, clients = setup(5, bits=bits)
    fp, q = inputs(clients, 257, bits)
    result = run(server, clients, q, fp)
    assert result.survivors == sorted(clients) and result.dropped == []
    assert np.array_equal(fp.signed(result.ring_sum), sum(q.values()))
    assert result.total_weight == 5.0


def test_a_masked_vector_is_uncorrelated_with_the_update():
    dim = 10**6
    server, clients = setup(3, dim=dim)
    fp = FixedPoint(32, 1.0, 3)
    x = np.random.default_rng(1).standard_normal(dim) * 0.3
    ring = fp.encode(x)
    masked = np.frombuffer(clients["c0"].mask(server.bundle_for("c0"), ring), dtype="<u4")
    assert abs(np.corrcoef(fp.signed(ring).astype(float), x)[0, 1]) > 0.99  # the encoding itself carries x
    assert abs(np.corrcoef(fp.signed(masked).astype(float), x)[0, 1]) < 0.01
    assert abs(np.corrcoef(masked.astype(float), x)[0, 1]) < 0.01


def test_one_of_five_dropped_after_masking_gives_the_exact_sum_of_the_other_four():
    server, clients = setup(5)
    fp, q = inputs(clients, 257)
    result = run(server, clients, q, fp, drop={"c2"})
    assert result.survivors == ["c0", "c1", "c3", "c4"] and result.dropped == ["c2"]
    assert np.array_equal(fp.signed(result.ring_sum), sum(q[n] for n in result.survivors))
    assert server.threshold == 3


def test_two_dropped_is_the_most_five_clients_with_threshold_three_survive():
    server, clients = setup(5)
    fp, q = inputs(clients, 257)
    result = run(server, clients, q, fp, drop={"c0", "c4"})
    assert np.array_equal(fp.signed(result.ring_sum), q["c1"] + q["c2"] + q["c3"])


def test_n_minus_t_plus_one_dropouts_are_refused_before_anyone_reveals_anything():
    server, clients = setup(5)  # threshold 3: three dropouts leave 2 < 3
    fp, q = inputs(clients, 257)
    for name in ["c0", "c1"]:
        server.add_masked(name, clients[name].mask(server.bundle_for(name), fp.to_ring(q[name])))
    with pytest.raises(SecAggError, match="2 of 5 clients sent masked updates; threshold 3"):
        server.unmask_request()
    assert server.stage == "failed"
    with pytest.raises(SecAggError):
        server.finish()


def test_a_client_refuses_to_unmask_below_threshold_even_if_the_server_asks():
    server, clients = setup(5)
    fp, q = inputs(clients, 257)
    bundle = server.bundle_for("c0")
    clients["c0"].mask(bundle, fp.to_ring(q["c0"]))
    request = {"session": bundle["session"], "survivors": ["c0", "c1"], "dropped": ["c2", "c3", "c4"]}
    with pytest.raises(SecAggError, match="only 2 survivors"):
        clients["c0"].unmask(request)


def test_safety_rule_never_both_shares_of_one_peer():
    server, clients = setup(5)
    fp, q = inputs(clients, 257)
    c0 = clients["c0"]
    bundle = server.bundle_for("c0")
    c0.mask(bundle, fp.to_ring(q["c0"]))
    s = bundle["session"]
    everyone = sorted(clients)
    with pytest.raises(SecAggError, match=r"both shares of \['c1'\] \(safety rule\)"):
        c0.unmask({"session": s, "survivors": everyone, "dropped": ["c1"]})
    first = c0.unmask({"session": s, "survivors": ["c0", "c1", "c2", "c3"], "dropped": ["c4"]})
    assert set(first["self_seed"]) == {"c0", "c1", "c2", "c3"} and set(first["mask_key"]) == {"c4"}
    # the same request again gets the same shares; moving c3 to the dropped side is refused
    assert c0.unmask({"session": s, "survivors": ["c0", "c1", "c2", "c3"], "dropped": ["c4"]}) == first
    with pytest.raises(SecAggError, match=r"already revealed the other share of \['c3'\]"):
        c0.unmask({"session": s, "survivors": ["c0", "c1", "c2"], "dropped": ["c3", "c4"]})
    with pytest.raises(SecAggError, match="already revealed the other share of"):
        c0.unmask({"session": s, "survivors": everyone, "dropped": []})  # c4's seed after its mask key
    with pytest.raises(SecAggError, match="cannot reveal shares at stage 'shared'"):
        clients["c1"].unmask({"session": s, "survivors": everyone, "dropped": []})  # it never masked
    clients["c1"].mask(server.bundle_for("c1"), fp.to_ring(q["c1"]))
    with pytest.raises(SecAggError, match="not listed as a survivor"):
        clients["c1"].unmask({"session": s, "survivors": ["c2", "c3", "c4"], "dropped": ["c0", "c1"]})


def test_unmask_request_must_account_for_every_client_that_finished_set_up():
    server, clients = setup(5)
    fp, q = inputs(clients, 257)
    bundle = server.bundle_for("c0")
    clients["c0"].mask(bundle, fp.to_ring(q["c0"]))
    with pytest.raises(SecAggError, match="account for exactly the 5 clients"):
        clients["c0"].unmask({"session": bundle["session"], "survivors": ["c0", "c1", "c2"], "dropped": ["c3"]})


def tamper(text: str, at: int = -5) -> str:
    raw = bytearray(crypto.b64d(text, "x"))
    raw[at] ^= 1
    return crypto.b64e(bytes(raw))


def test_forged_or_misdirected_shares_fail_authentication():
    server, clients = setup(3)
    fp, q = inputs(clients, 257, n=3)
    bundle = server.bundle_for("c1")
    forged = json.loads(json.dumps(bundle))
    forged["shares"]["c0"] = tamper(forged["shares"]["c0"])
    with pytest.raises(SecAggError, match="share from 'c0' to 'c1' failed authentication"):
        clients["c1"].mask(forged, fp.to_ring(q["c1"]))
    misdirected = json.loads(json.dumps(bundle))
    misdirected["shares"]["c0"] = server.bundle_for("c2")["shares"]["c0"]  # c0's share for c2, handed to c1
    with pytest.raises(SecAggError, match="failed authentication"):
        clients["c1"].mask(misdirected, fp.to_ring(q["c1"]))


def test_a_wrong_revealed_share_is_caught_not_summed():
    server, clients = setup(5)
    fp, q = inputs(clients, 257)
    for name, c in clients.items():
        masked = c.mask(server.bundle_for(name), fp.to_ring(q[name]))
        if name != "c4":
            server.add_masked(name, masked)
    request = server.unmask_request()
    for name in request["survivors"]:
        answer = clients[name].unmask(request)
        if name == "c1":
            answer["mask_key"]["c4"] = tamper(answer["mask_key"]["c4"])
        server.receive_unmask(name, answer)
    with pytest.raises(SecAggError, match="inconsistent"):
        server.finish()
    assert server.stage == "failed"


def test_finish_waits_for_enough_answers():
    server, clients = setup(5)
    fp, q = inputs(clients, 257)
    for name, c in clients.items():
        server.add_masked(name, c.mask(server.bundle_for(name), fp.to_ring(q[name])))
    request = server.unmask_request()
    for name in ["c0", "c1"]:
        server.receive_unmask(name, clients[name].unmask(request))
    with pytest.raises(SecAggError, match="fewer than 3 shares"):
        server.finish()
    server.receive_unmask("c2", clients["c2"].unmask(request))
    assert np.array_equal(fp.signed(server.finish().ring_sum), sum(q.values()))


def test_server_refuses_malformed_or_out_of_order_messages():
    params = SecAggParams(16, 8)
    server = SecAggServer(params)
    a, b = SecAggClient("a", params), SecAggClient("b", params)
    with pytest.raises(SecAggError, match="claims to be from 'a'"):
        server.receive_keys("b", a.advertise())
    with pytest.raises(SecAggError, match="cannot advertise its keys at stage 'advertised'"):
        a.advertise()
    # a man in the middle swaps a's keys for its own
    server.receive_keys("a", {"client": "a", "mask_pk": crypto.b64e(crypto.public_bytes(crypto.new_private_key())),
                              "enc_pk": crypto.b64e(crypto.public_bytes(crypto.new_private_key()))})
    server.receive_keys("b", b.advertise())
    with pytest.raises(SecAggError, match="cannot accept a masked vector at stage 'keys'"):
        server.add_masked("a", bytes(16))
    roster = server.roster()
    with pytest.raises(SecAggError, match="does not carry client 'a'"):
        a.share_keys(roster)  # the server swapped a's keys
    server.receive_shares("b", b.share_keys(roster))
    with pytest.raises(SecAggError, match="only 1 clients finished set-up, threshold 2"):
        server.close_sharing()


def test_a_server_cannot_weaken_the_threshold():
    params = SecAggParams(32, 10)
    server = SecAggServer(SecAggParams(32, 10, threshold=2))  # majority of 5 would be 3
    clients = {f"c{i}": SecAggClient(f"c{i}", params) for i in range(5)}
    for name, c in clients.items():
        server.receive_keys(name, c.advertise())
    with pytest.raises(SecAggError, match="threshold 2, expected 3"):
        clients["c0"].share_keys(server.roster())


def test_mismatched_ring_or_layout_is_refused():
    server = SecAggServer(SecAggParams(32, 10, layout="x"))
    c = SecAggClient("a", SecAggParams(16, 10, layout="x"))
    server.receive_keys("a", c.advertise())
    server.receive_keys("b", SecAggClient("b", SecAggParams(32, 10, layout="x")).advertise())
    with pytest.raises(SecAggError, match="does not match client 'a'"):
        c.share_keys(server.roster())


def test_secagg_plus_sparse_graph_sums_exactly_with_a_dropout():
    server, clients = setup(9, dim=64, neighbours=4)
    groups = server._groups
    assert all(len(g) == 5 for g in groups.values())
    assert all(a in groups[b] for a in groups for b in groups[a])  # symmetric
    assert server.threshold == 3
    assert len(server.bundle_for("c0")["shares"]) == 4  # c0 holds shares of its 4 neighbours only, not of 8 peers
    fp, q = inputs(clients, 64, n=9)
    result = run(server, clients, q, fp, drop={"c5"})
    assert np.array_equal(fp.signed(result.ring_sum), sum(q[n] for n in result.survivors))


def test_shamir_needs_threshold_shares_and_detects_a_bad_one():
    secret = bytes(range(32))
    shares = shamir.split(secret, [1, 2, 3, 4, 5], 3)
    assert shamir.combine({x: shares[x] for x in (2, 4, 5)}, 3, "s") == secret
    with pytest.raises(SecAggError, match="do not encode a 32-byte secret"):  # 2 shares of a degree-2 polynomial
        shamir.combine({x: shares[x] for x in (1, 3)}, 2, "s")  # give a field element, 2^-265 odds of < 2^256
    with pytest.raises(SecAggError, match="2 shares, 3 needed"):
        shamir.combine({x: shares[x] for x in (1, 3)}, 3, "s")
    bad = dict(shares)
    bad[5] = (int.from_bytes(bad[5], "big") + 1).to_bytes(shamir.SHARE_BYTES, "big")
    with pytest.raises(SecAggError, match="inconsistent"):
        shamir.combine(bad, 3, "s")


from hypothesis import given, settings, strategies as st  # noqa: E402


@settings(max_examples=25, deadline=None)
@given(st.data())
def test_any_dropout_pattern_gives_the_exact_sum_or_a_refusal(data):
    n = data.draw(st.integers(2, 7), label="clients")
    t = data.draw(st.integers(2, n), label="threshold")
    dropped = data.draw(st.sets(st.sampled_from([f"c{i}" for i in range(n)])), label="dropped")
    server, clients = setup(n, dim=16, threshold=t)
    fp, q = inputs(clients, 16, n=n, seed=n * 10 + t)
    if n - len(dropped) >= t:
        result = run(server, clients, q, fp, drop=dropped)
        assert result.dropped == sorted(dropped)
        assert np.array_equal(fp.signed(result.ring_sum), sum((q[c] for c in result.survivors), np.zeros(16, np.int64)))
    else:
        with pytest.raises(SecAggError, match="the round is refused"):
            run(server, clients, q, fp, drop=dropped)
