"""Epsilon from dp-accounting: equal to the library's own reference, and to a published value."""

from __future__ import annotations

from types import SimpleNamespace

import dp_accounting
import numpy as np
import pytest
from dp_accounting.pld import pld_privacy_accountant
from dp_accounting.rdp import rdp_privacy_accountant

from skyfed.config import load_config
from skyfed.security.accounting import dpsgd_epsilon, epsilon
from skyfed.security.privacy import PrivacyAccountant


def _reference_rdp(q: float, sigma: float, steps: int, delta: float, orders=None) -> rdp_privacy_accountant.RdpAccountant:
    acc = rdp_privacy_accountant.RdpAccountant(orders) if orders else rdp_privacy_accountant.RdpAccountant()
    acc.compose(dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps))
    return acc


@pytest.mark.parametrize("q, sigma, steps", [(0.01, 1.1, 1000), (0.05, 0.8, 200), (256 / 60000, 1.12, 14062)])
def test_epsilon_equals_the_rdp_accountants_reference(q, sigma, steps):
    assert dpsgd_epsilon(q, sigma, steps, 1e-5) == _reference_rdp(q, sigma, steps, 1e-5).get_epsilon(1e-5)


def test_pld_epsilon_equals_the_pld_accountants_reference():
    ref = pld_privacy_accountant.PLDAccountant(value_discretization_interval=1e-4)
    ref.compose(dp_accounting.SelfComposedDpEvent(dp_accounting.PoissonSampledDpEvent(0.02, dp_accounting.GaussianDpEvent(1.0)), 300))
    assert dpsgd_epsilon(0.02, 1.0, 300, 1e-6, "pld") == ref.get_epsilon(1e-6)
    assert dpsgd_epsilon(0.02, 1.0, 300, 1e-6, "pld") <= dpsgd_epsilon(0.02, 1.0, 300, 1e-6, "rdp")


def test_full_participation_is_the_plain_gaussian_composed():
    ref = rdp_privacy_accountant.RdpAccountant()
    ref.compose(dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(2.0), 7))
    assert epsilon([(1.0, 2.0, 7)], 1e-5) == ref.get_epsilon(1e-5)
    assert epsilon([], 1e-5) == 0.0


def test_opacus_rdp_accountant_agrees():
    """A second maintained implementation (opacus' RDP accountant) gives the same epsilon."""
    from opacus.accountants import RDPAccountant

    acc = RDPAccountant()
    acc.history = [(1.1, 256 / 60000, 14062)]
    assert dpsgd_epsilon(256 / 60000, 1.1, 14062, 1e-5) == pytest.approx(acc.get_epsilon(1e-5), rel=1e-6)


def test_published_mnist_value_of_tensorflow_privacy():
    """TensorFlow Privacy's MNIST DP-SGD tutorial (tutorials/README.md, "Select Parameters",
    first row): 60,000 examples, batch 256, noise multiplier 1.12, 60 epochs, delta 1e-5:
    epsilon 2.92. That figure used the classic RDP-to-(eps, delta) conversion
    eps = min_a RDP(a) + log(1/delta) / (a - 1) (Mironov 2017, Prop. 3) at the tutorial's
    orders; the library's RDP curve with that conversion gives 2.92, and its own tighter
    conversion gives less."""
    orders = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))
    steps = 60 * 60000 // 256
    acc = _reference_rdp(256 / 60000, 1.12, steps, 1e-5, orders)
    classic = float(np.min(acc.rdp - np.log(1e-5) / (np.asarray(acc.orders) - 1)))
    assert round(classic, 2) == 2.92
    assert dpsgd_epsilon(256 / 60000, 1.12, steps, 1e-5) < classic


def _outcome(n: int, meta=None):
    return SimpleNamespace(accepted=[f"c{i}" for i in range(n)], meta=meta or {})


def test_observer_counts_aggregated_rounds_and_missing_noise_shares():
    cfg = load_config(None, "smoke", [
        "security.dp.clip=1", "security.dp.noise_multiplier=1.5", "security.dp.noise=distributed",
        "federation.clients=[{name: a}, {name: b}, {name: c}, {name: d}]",
    ])
    obs = PrivacyAccountant(cfg, cohort=4)
    e0 = obs.round_end(0, {"aggregated": True}, _outcome(4))["epsilon"]
    e1 = obs.round_end(1, {"aggregated": False}, _outcome(0))["epsilon"]  # nothing released
    e2 = obs.round_end(2, {"aggregated": True}, _outcome(3))["epsilon"]  # one share of noise missing
    assert e0 == epsilon([(1.0, 1.5, 1)], 1e-5) and e1 == e0
    assert e2 == epsilon([(1.0, 1.5, 1), (1.0, 1.5 * (3 / 4) ** 0.5, 1)], 1e-5)
    assert obs.summary()["epsilon"] == e2
    resumed = PrivacyAccountant(cfg, cohort=4)
    resumed.resume_from({"dp_rounds": [list(r) for r in obs.ledger.runs()]})
    assert resumed.epsilon() == e2


def test_observer_document_ledger_per_client():
    cfg = load_config(None, "smoke", ["security.dp.document.noise_multiplier=1.0"])
    obs = PrivacyAccountant(cfg, cohort=3)
    report = {"steps": 5, "sample_rate": 0.01, "noise_multiplier": 1.0, "delta": 1e-5}
    obs.round_end(0, {"aggregated": True}, _outcome(1, {"aws": {"dp_document": report}}))
    out = obs.round_end(1, {"aggregated": True}, _outcome(1, {"aws": {"dp_document": report}}))
    assert out["epsilon_document"] == {"aws": dpsgd_epsilon(0.01, 1.0, 10, 1e-5)}
    assert out["epsilon"] == out["epsilon_document"]["aws"]
