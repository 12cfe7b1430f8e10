"""Accounting from first principles: the PLD accountant against closed forms and RDP,
σ calibration for every accountant, and group privacy."""

import math

import numpy as np
import pytest
import torch
from dp_accounting import GaussianDpEvent, PoissonSampledDpEvent
from dp_accounting.pld.pld_privacy_accountant import PLDAccountant as GooglePLD
from opacus.accountants import PRVAccountant, RDPAccountant, create_accountant
from scipy.optimize import brentq, minimize_scalar
from scipy.special import log_ndtr, ndtr
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from dpstudy.config import ACCOUNTANTS, RunConfig
from dpstudy.errors import ConfigError
from dpstudy.methods import build_method
from dpstudy.privacy.accounting import calibrate_noise, epsilon, group_privacy
from dpstudy.privacy.pld import PLDAccountant

DELTA = 1e-5


def gaussian_delta(eps: float, mu: float) -> float:
    """Exact δ(ε) of the Gaussian mechanism with sensitivity/σ = μ (Balle & Wang 2018)."""
    return float(ndtr(-eps / mu + mu / 2) - math.exp(eps + log_ndtr(-eps / mu - mu / 2)))


def gaussian_epsilon(mu: float, delta: float) -> float:
    """Exact ε of the Gaussian mechanism at δ: the root of δ(ε) = δ (decreasing in ε)."""
    return brentq(lambda e: gaussian_delta(e, mu) - delta, 0.0, 2000.0, xtol=1e-12)


def rdp_gaussian_epsilon(sigma: float, steps: int, delta: float) -> float:
    """T Gaussian steps have RDP Tα/(2σ²); converted to (ε, δ) by Balle et al. 2020
    (Thm. 21), the conversion Opacus uses, minimised over continuous α."""
    def eps(a):
        return (steps * a / (2 * sigma ** 2) + math.log((a - 1) / a)
                - (math.log(delta) + math.log(a)) / (a - 1))
    return float(minimize_scalar(eps, bounds=(1.001, 1e4), method="bounded",
                                 options={"xatol": 1e-9}).fun)


def independent(accountant: str, sigma: float, q: float, steps: int):
    """A fresh accountant of the named kind, fed step by step as training feeds it."""
    acc = {"rdp": RDPAccountant, "prv": PRVAccountant, "pld": PLDAccountant}[accountant]()
    for _ in range(steps):
        acc.step(noise_multiplier=sigma, sample_rate=q)
    return acc


# ---- the PLD accountant ----------------------------------------------------------

@pytest.mark.parametrize("sigma,steps", [(1.0, 1), (2.0, 10), (10.0, 270), (1.42, 270),
                                         (0.8, 50)])
def test_pld_without_subsampling_matches_the_exact_gaussian_mechanism(sigma, steps):
    """q = 1: T steps at σ are one Gaussian mechanism with μ = √T/σ, whose ε is exact.
    The PLD is pessimistic (an upper bound) and its grid is 1e-3 wide."""
    exact = gaussian_epsilon(math.sqrt(steps) / sigma, DELTA)
    pld = epsilon(1.0, sigma, steps, DELTA, "pld")
    assert exact <= pld <= exact + 1e-3
    assert epsilon(1.0, sigma, steps, DELTA, "rdp") > pld + 0.1   # RDP is looser


def test_pld_history_of_different_noise_levels_composes_like_one_gaussian():
    """Gaussian steps at σ₁ (n₁ times) and σ₂ (n₂ times) compose to μ² = n₁/σ₁² + n₂/σ₂²;
    fed through Opacus's ``step`` interface the history keeps both runs."""
    acc = PLDAccountant()
    for sigma, n in [(3.0, 20), (1.5, 7), (3.0, 5)]:
        for _ in range(n):
            acc.step(noise_multiplier=sigma, sample_rate=1.0)
    assert acc.history == [(3.0, 1.0, 20), (1.5, 1.0, 7), (3.0, 1.0, 5)]
    exact = gaussian_epsilon(math.sqrt(25 / 9 + 7 / 1.5 ** 2), DELTA)
    assert exact <= acc.get_epsilon(DELTA) <= exact + 1e-3


def test_pld_reproduces_the_issue_reference_points_and_dp_accounting_itself():
    """σ = 7.578 and 1.42 at q = 1/9, 270 steps (issue 9): PLD 0.906 and 7.28, RDP 0.992
    and 7.95; the wrapper equals dp-accounting's own accountant at its default grid."""
    for sigma, pld_ref, rdp_ref in [(7.578, 0.906, 0.992), (1.42, 7.28, 7.95)]:
        ours = epsilon(1 / 9, sigma, 270, DELTA, "pld")
        assert ours == pytest.approx(pld_ref, abs=0.005)
        assert epsilon(1 / 9, sigma, 270, DELTA, "rdp") == pytest.approx(rdp_ref, abs=0.005)
        google = GooglePLD()
        google.compose(PoissonSampledDpEvent(1 / 9, GaussianDpEvent(sigma)), 270)
        assert google.get_epsilon(DELTA) <= ours <= google.get_epsilon(DELTA) + 1e-3


@pytest.mark.parametrize("q", [0.01, 1 / 9, 0.5, 1.0])
@pytest.mark.parametrize("sigma,steps", [(0.6, 100), (1.0, 300), (4.0, 50)])
def test_pld_is_never_above_rdp(q, sigma, steps):
    pld = epsilon(q, sigma, steps, DELTA, "pld")
    assert 0 < pld <= epsilon(q, sigma, steps, DELTA, "rdp")


def test_pld_holds_at_large_epsilon_where_prv_fails():
    """The study spans ε into the hundreds: PLD still matches the exact value there."""
    exact = gaussian_epsilon(math.sqrt(270) / 0.5, DELTA)
    assert exact > 100
    assert exact <= epsilon(1.0, 0.5, 270, DELTA, "pld") <= exact + 1e-3


def test_empty_pld_history_spends_nothing():
    assert PLDAccountant().get_epsilon(DELTA) == 0.0
    assert epsilon(0.1, 1.0, 0, DELTA, "pld") == 0.0


def test_training_engine_uses_the_pld_accountant_for_per_epoch_epsilon():
    """``accountant=pld`` through the real make_private path: the optimizer's step hook
    feeds a PLD accountant, whose ε equals the pure function's for the same steps."""
    data = TensorDataset(torch.randn(20, 4), torch.zeros(20, dtype=torch.long))
    cfg = RunConfig(method="dp_sgd", noise_multiplier=1.3, accountant="pld", epochs=1,
                    batch_size=5)
    method = build_method(cfg)
    model = nn.Linear(4, 2)
    model, opt, loader = method.attach(model, torch.optim.SGD(model.parameters(), lr=0.1),
                                       DataLoader(data, batch_size=5))
    assert isinstance(method.engine.accountant, PLDAccountant)
    for x, _ in loader:
        opt.zero_grad()
        model(x).sum().backward()
        opt.step()
    stats = method.epoch_stats()
    assert stats["steps"] == len(loader) == 4 and method.sample_rate == 0.25
    assert stats["epsilon"] == epsilon(0.25, 1.3, 4, DELTA, "pld")
    assert stats["epsilon"] < epsilon(0.25, 1.3, 4, DELTA, "rdp")


def test_pld_accountant_state_survives_a_checkpoint():
    acc = independent("pld", 2.0, 0.1, 30)
    restored = PLDAccountant()
    restored.load_state_dict(acc.state_dict())
    assert restored.get_epsilon(DELTA) == acc.get_epsilon(DELTA)
    # the stored mechanism is the name the accountant is registered under
    assert isinstance(create_accountant(acc.state_dict()["mechanism"]), PLDAccountant)
    with pytest.raises(ValueError):
        RDPAccountant().load_state_dict(acc.state_dict())


# ---- calibration ---------------------------------------------------------------

@pytest.mark.parametrize("accountant", ACCOUNTANTS)
@pytest.mark.parametrize("target", [1.0])
def test_calibrated_sigma_reaches_the_target_under_the_chosen_accountant(accountant, target):
    """ε of the calibrated σ, recomputed by a fresh accountant of the same kind fed step
    by step, is at most the target and within the search tolerance (0.01) of it. σ from
    another accountant misses that window (PLD/PRV need 5–10 % less noise than RDP)."""
    q, steps = 1 / 9, 270
    sigma = calibrate_noise(target, q, steps, DELTA, accountant)
    eps = independent(accountant, sigma, q, steps).get_epsilon(DELTA)
    assert target - 0.02 <= eps <= target
    other = "pld" if accountant == "rdp" else "rdp"
    other_eps = independent(accountant, calibrate_noise(target, q, steps, DELTA, other),
                            q, steps).get_epsilon(DELTA)
    assert not target - 0.02 <= other_eps <= target


@pytest.mark.parametrize("accountant", ACCOUNTANTS)
def test_calibration_against_closed_forms_without_subsampling(accountant):
    """q = 1, 100 steps, target ε = 3: the calibrated σ checked by formulas that share no
    code with the accountants — exact Gaussian ε for PLD and PRV (which bound it from
    above, so the exact ε is below the target but close), RDP's closed form for rdp."""
    target, steps = 3.0, 100
    sigma = calibrate_noise(target, 1.0, steps, DELTA, accountant)
    if accountant == "rdp":
        eps = rdp_gaussian_epsilon(sigma, steps, DELTA)
    else:
        eps = gaussian_epsilon(math.sqrt(steps) / sigma, DELTA)
    assert target - 0.05 <= eps <= target


@pytest.mark.parametrize("accountant", ACCOUNTANTS)
def test_target_epsilon_run_is_calibrated_with_its_own_accountant(accountant):
    """What training does with ``--target-epsilon`` and ``--accountant``: the σ it picks
    spends the target, to the search tolerance, under that accountant and no other."""
    cfg = RunConfig(method="dp_sgd", target_epsilon=2.0, accountant=accountant, epochs=10,
                    batch_size=5)
    method = build_method(cfg)
    model = nn.Linear(4, 2)
    data = TensorDataset(torch.randn(20, 4), torch.zeros(20, dtype=torch.long))
    method.attach(model, torch.optim.SGD(model.parameters(), lr=0.1),
                  DataLoader(data, batch_size=5))
    assert method.sample_rate == 0.25
    spent = {name: independent(name, method.noise_multiplier, 0.25, 40).get_epsilon(DELTA)
             for name in ACCOUNTANTS}
    on_target = {name for name, eps in spent.items() if 1.98 <= eps <= 2.0}
    assert accountant in on_target
    assert ("rdp" in on_target) == (accountant == "rdp")   # RDP is 5–10 % looser


def test_calibration_reports_an_unreachable_target_as_a_config_error():
    with pytest.raises(ConfigError, match="target_epsilon=1e-09"):
        calibrate_noise(1e-9, 0.5, 1000, DELTA, "pld")


# ---- group privacy -------------------------------------------------------------

def test_group_privacy_is_the_standard_bound():
    assert group_privacy(0.5, 1e-5, 1) == (0.5, 1e-5)
    eps, delta = group_privacy(0.5, 1e-5, 11)
    assert eps == pytest.approx(5.5)
    assert delta == pytest.approx(11 * math.exp(10 * 0.5) * 1e-5)
    assert group_privacy(0.0, 1e-6, 4) == (0.0, pytest.approx(4e-6))
    assert group_privacy(8.0, 1e-5, 11) == (88.0, 1.0)   # vacuous: capped at 1, no overflow
    assert group_privacy(2.0, 0.01, 2) == (4.0, pytest.approx(0.02 * math.exp(2)))   # 0.148
    assert group_privacy(2.0, 0.1, 2) == (4.0, 1.0)        # 0.2·e² = 1.48: capped at 1
    assert group_privacy(1.0, 1.0, 2) == (2.0, 1.0)        # δ = 1 is valid, if vacuous
    assert group_privacy(2.0, 0.0, 3) == (6.0, 0.0)   # pure DP stays pure


@pytest.mark.parametrize("eps", [0.1, 0.5, 1.0, 2.0])
@pytest.mark.parametrize("k", [1, 2, 5, 11])
def test_group_privacy_dominates_chaining_and_holds_for_a_gaussian_group(eps, k):
    """Chaining k neighbours gives δ_k = Σ_{i<k} e^{iε} δ, which the bound must not
    undercut; and for the Gaussian mechanism, where a group of k has sensitivity k,
    the exact δ at kε is within the bound."""
    delta = 1e-6
    chained = delta * sum(math.exp(i * eps) for i in range(k))
    k_eps, k_delta = group_privacy(eps, delta, k)
    assert k_delta >= min(chained, 1.0) * (1 - 1e-12)
    mu = brentq(lambda m: gaussian_delta(eps, m) - delta, 1e-6, 50)   # σ giving (ε, δ)
    assert gaussian_delta(k_eps, k * mu) <= k_delta + 1e-15


@pytest.mark.parametrize("args,says", [
    ((1.0, 1e-5, 0), "group size k=0 must be an integer ≥ 1"), ((1.0, 1e-5, 2.5), "k=2.5"),
    ((-1.0, 1e-5, 2), "needs ε ≥ 0"), ((1.0, 1.5, 2), "δ in \\[0, 1\\]"),
    ((float("nan"), 1e-5, 2), "\\(ε, δ\\)=\\(nan, 1e-05\\)")])
def test_group_privacy_rejects_bad_input(args, says):
    with pytest.raises(ConfigError, match=says):
        group_privacy(*args)


def test_pld_is_recorded_as_a_valid_accountant_name():
    assert "pld" in ACCOUNTANTS
    assert RunConfig(method="dp_sgd", noise_multiplier=1.0, accountant="pld").accountant == "pld"
    assert np.isfinite(epsilon(0.1, 1.0, 10, DELTA, "pld"))
