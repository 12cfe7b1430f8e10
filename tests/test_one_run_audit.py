"""The one-run audit (Steinke, Nasr & Jagielski 2023): its bound on mechanisms whose ε is
known, its canaries inside the real DP optimizer, and real trainings it must tell apart."""

import json
import math

import numpy as np
import pytest
import torch
from scipy import stats
from scipy.optimize import brentq
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from dpstudy.config import RunConfig
from dpstudy.errors import ConfigError
from dpstudy.methods import build_method
from dpstudy.privacy import optimizer as dp_optimizer
from dpstudy.privacy.canaries import GradientCanaries
from dpstudy.privacy.one_run_audit import (GUESS_FRACTIONS, audit, epsilon_lower_bound,
                                           guess, p_value)
from dpstudy.train import train

from _runs import quiet

DELTA = 1e-5


def gaussian_epsilon(sigma: float, delta: float) -> float:
    """Exact ε(δ) of the Gaussian mechanism with sensitivity 1 (Balle & Wang 2018)."""
    def excess(e):
        return (stats.norm.cdf(-e * sigma + 1 / (2 * sigma))
                - math.exp(e) * stats.norm.cdf(-e * sigma - 1 / (2 * sigma)) - delta)
    return brentq(excess, 0.0, 200.0)


def _gaussian_audit(sigma: float, m: int, seed: int) -> float:
    """Each of m canaries adds 1 (included) or 0 to its own Gaussian mechanism."""
    rng = np.random.default_rng(seed)
    included = rng.random(m) < 0.5
    return audit(included + sigma * rng.standard_normal(m), included, DELTA)["epsilon_lower_bound"]


@pytest.mark.parametrize("sigma", [0.5, 1.0, 2.0, 5.0])
def test_the_bound_never_exceeds_the_true_epsilon_of_a_gaussian_mechanism(sigma):
    true = gaussian_epsilon(sigma, DELTA)
    bounds = [_gaussian_audit(sigma, 1000, seed) for seed in range(20)]
    assert max(bounds) <= true
    # at 95 % confidence: a bound above the truth would be a 5 % event per run, and the
    # truth here is far above every bound anyway; a bound of 0 is the honest "nothing"
    assert min(bounds) >= 0.0


def test_the_bound_grows_towards_the_true_epsilon_with_more_canaries():
    true = gaussian_epsilon(1.0, DELTA)
    small, large = _gaussian_audit(1.0, 100, 0), _gaussian_audit(1.0, 100_000, 0)
    assert small < large <= true
    assert large > 0.4 * true             # 2.05 of 4.38, as the paper's Figure 1 shows


def test_no_signal_gives_no_bound_and_a_perfect_guess_a_large_one():
    rng = np.random.default_rng(3)
    included = rng.random(1000) < 0.5
    assert audit(rng.standard_normal(1000), included, DELTA)["epsilon_lower_bound"] < 0.2
    perfect = audit(included.astype(float), included, DELTA)
    # k guesses at each end: with 1000 canaries not exactly half included, a few of the
    # widest guesses must miss even for a perfect score
    assert perfect["correct"] >= 0.99 * perfect["guesses"]
    assert perfect["epsilon_lower_bound"] > 3


def test_p_value_is_the_binomial_tail_without_delta():
    # ε = 0: every guess is a coin flip, P[≥ v of r] exactly
    assert p_value(100, 20, 15, 0.0, 0.0) == pytest.approx(stats.binom.sf(14, 20, 0.5))
    assert p_value(100, 20, 15, 1.0, 0.0) == pytest.approx(
        stats.binom.sf(14, 20, math.e / (1 + math.e)))
    assert p_value(100, 20, 15, 1.0, 1e-3) > p_value(100, 20, 15, 1.0, 0.0)   # δ only adds
    assert p_value(100, 20, 0, 1.0, DELTA) == 1.0                # no correct guess needed
    assert p_value(20, 20, 20, 0.0, 0.0) == pytest.approx(0.5 ** 20)   # v = r = m allowed
    with pytest.raises(ValueError, match="v ≤ r ≤ m"):
        p_value(10, 20, 5, 1.0, 0.0)
    eps = epsilon_lower_bound(1000, 200, 150, DELTA)
    assert p_value(1000, 200, 150, eps, DELTA) <= 0.05 < p_value(1000, 200, 150, eps + 0.01, DELTA)


@pytest.mark.parametrize("m,r,v,eps,delta", [(100, 20, 15, 1.0, 1e-3), (1000, 200, 150, 0.5, 1e-4),
                                              (50, 10, 10, 2.0, 1e-3), (100, 20, 5, 0.0, 0.01)])
def test_p_value_is_theorem_5_2_with_its_delta_term(m, r, v, eps, delta):
    """β + 2mδ · max_{i=1..v} P[v − i ≤ Binomial(r, e^ε/(1+e^ε)) < v] / i, capped at 1
    (the last case is capped), each probability summed term by term."""
    acc = math.exp(eps) / (1 + math.exp(eps))
    pmf = [math.comb(r, j) * acc ** j * (1 - acc) ** (r - j) for j in range(r + 1)]
    beta = sum(pmf[v:])
    alpha = max(sum(pmf[v - i:v]) / i for i in range(1, v + 1))
    assert p_value(m, r, v, eps, delta) == pytest.approx(min(1.0, beta + 2 * m * delta * alpha),
                                                         rel=1e-9)


@pytest.mark.parametrize("m,guesses,correct", [(100, 2, 0), (1000, 20, 10)])
def test_without_any_bound_the_smallest_guess_count_is_reported(m, guesses, correct):
    """Tied scores and alternating truth: every guess count is right half the time, no ε
    is rejected, and the record is that of the first (smallest) count, k = max(1, ⌊fm⌋/2)
    at each end; the truth may be given as 0/1."""
    included = np.arange(m) % 2 == 0
    result = audit(np.zeros(m), included.astype(int), DELTA)
    assert result == {"m": m, "n_included": m // 2, "guesses": guesses, "correct": correct,
                      "epsilon_lower_bound": 0.0, "confidence": 0.95, "delta": DELTA,
                      "guess_fractions": list(GUESS_FRACTIONS)}


def test_the_reported_bound_is_judged_at_the_bonferroni_corrected_level():
    included = np.random.default_rng(5).random(1000) < 0.5
    result = audit(included.astype(float), included, DELTA)
    assert result["epsilon_lower_bound"] == epsilon_lower_bound(
        1000, result["guesses"], result["correct"], DELTA, 0.05 / len(GUESS_FRACTIONS))
    assert result["epsilon_lower_bound"] < epsilon_lower_bound(
        1000, result["guesses"], result["correct"], DELTA, 0.05)


def test_guesses_take_both_ends_of_the_ranking():
    assert list(guess(np.array([0.3, -2.0, 5.0, 0.1, 1.0]), 2)) == [0, -1, 1, -1, 1]


def _private_linear(method: str, **fields):
    """A linear model made private as training does it; σ = 0 shows the canaries bare."""
    torch.manual_seed(0)
    loader = DataLoader(TensorDataset(torch.randn(16, 4), torch.arange(16)), batch_size=4)
    cfg = RunConfig(method=method, epochs=1, batch_size=4, noise_multiplier=1.0,
                    audit_canaries=10, **fields)
    dp = build_method(cfg)
    model = nn.Linear(4, 4)
    _, opt, _ = dp.attach(model, torch.optim.SGD(model.parameters(), lr=0.0), loader)
    opt.noise_multiplier = 0.0
    return dp, opt


def _step_with_zero_data_gradients(opt) -> list[torch.Tensor]:
    for p in opt.params:
        p.grad_sample = torch.zeros(4, *p.shape)
    opt.clip_and_accumulate()
    opt.add_noise()
    return [p.grad.clone() for p in opt.params]


@pytest.mark.parametrize("method,fields,value", [
    ("dp_sgd", {"max_grad_norm": 0.5}, 0.5),                       # at the bound: kept
    ("auto_clip", {"max_grad_norm": 0.5, "gamma": 0.1}, 0.5 * 0.5 / (0.5 + 0.1)),
    ("dp_sgd", {"max_grad_norm": 1.0, "clipping": "per_layer"}, 1 / math.sqrt(2)),
])
def test_a_canary_meets_the_clip_function_of_its_method(method, fields, value):
    dp, opt = _private_linear(method, **fields)
    canaries = dp.canaries
    canaries.sample_rate = 1.0                              # every included canary, every step
    grads = _step_with_zero_data_gradients(opt)
    flat = torch.cat([g.flatten() for g in grads])
    offsets = [0, opt.params[0].numel()]
    at = torch.stack([flat[offsets[int(i)] + int(j)] for i, j in zip(canaries.param,
                                                                     canaries.local)])
    expected = torch.where(canaries.included, value, 0.0).to(at)
    torch.testing.assert_close(at, expected)
    assert float(flat.abs().sum()) == pytest.approx(float(expected.sum()))   # nowhere else
    torch.testing.assert_close(canaries.scores, expected.double())


def test_a_canary_on_a_coordinate_the_sparsification_mask_drops_adds_nothing():
    dp, opt = _private_linear("random_sparsification", final_rate=0.5, refresh=1)
    dp.before_step(0, 0, 4)
    dp.sparsifier.masks = [torch.zeros_like(m) for m in dp.sparsifier.masks]   # drop all
    dp.canaries.sample_rate = 1.0
    grads = _step_with_zero_data_gradients(opt)
    assert all(float(g.abs().sum()) == 0.0 for g in grads)


def test_canaries_need_a_distinct_coordinate_each_and_a_valid_count():
    with pytest.raises(ValueError, match="1000 canaries need as many parameters"):
        GradientCanaries([torch.Size([10, 10])], 1000, 1.0, 0.5, seed=0)
    c = GradientCanaries([torch.Size([10, 10]), torch.Size([7])], 107, 1.0, 0.5, seed=0)
    assert {(int(i), int(j)) for i, j in zip(c.param, c.local)} == {
        (0, j) for j in range(100)} | {(1, j) for j in range(7)}     # every coordinate once
    with pytest.raises(ConfigError, match="audit_canaries=-1"):
        RunConfig(audit_canaries=-1)


def test_canaries_are_seeded_fair_and_land_on_their_own_logical_coordinates():
    """Two instances with one seed agree (placement, inclusion, every step's draw, even
    interleaved); about half are included and only included ones are drawn; a canary's
    value is added to (not written over) its coordinate in logical order, also in a
    channels-last gradient; masks scale it; each observation adds to the scores."""
    shapes = [torch.Size([2, 3, 2, 2]), torch.Size([5])]
    a, b = (GradientCanaries(shapes, 10, 2.0, 0.5, seed=4) for _ in range(2))
    assert torch.equal(a.param, b.param) and torch.equal(a.local, b.local)
    assert torch.equal(a.included, b.included)
    for _ in range(3):
        assert torch.equal(a.draw(), b.draw())
    sizes = torch.tensor([s.numel() for s in shapes])
    assert ((a.local >= 0) & (a.local < sizes[a.param])).all()
    many = GradientCanaries([torch.Size([4000])], 2000, 1.0, 0.5, seed=0)
    assert 900 < int(many.included.sum()) < 1100
    drawn = many.draw()
    assert not (drawn & ~many.included).any() and 400 < int(drawn.sum()) < 600

    assert set(a.param.tolist()) == {0, 1}
    flat_index = torch.tensor([0, 24])[a.param] + a.local        # logical (row-major) order
    grads = [torch.ones(shapes[0]).to(memory_format=torch.channels_last), torch.ones(5)]
    values = torch.arange(1.0, 11.0, dtype=torch.float64)
    a.add_to(grads, values)
    flat = torch.cat([g.flatten() for g in grads])
    expected = torch.ones(29)
    expected[flat_index] += values.float()
    torch.testing.assert_close(flat, expected)
    a.observe(grads)
    a.observe(grads)
    assert a.steps == 2
    torch.testing.assert_close(a.scores, 2 * (1 + values))
    masks = [torch.ones(shapes[0]), torch.ones(5)]
    masks[1][:] = 0.0                                             # drop the second tensor
    present = torch.ones(10, dtype=torch.bool)
    torch.testing.assert_close(a.values(present, masks),
                               torch.where(a.param == 0, 2.0, 0.0).double())


AUDITED = dict(model="unet", data="synthetic", limit=12, image_size=(32, 32), base_width=8,
               depth=2, epochs=3, batch_size=4, audit_canaries=1000)


def _audited_run(tmp_path, **fields) -> dict:
    run_dir = train(RunConfig(**AUDITED, **fields), tmp_path, progress=False, log=quiet)
    return json.loads((run_dir / "config.json").read_text())


@pytest.mark.slow
def test_real_trainings_a_private_run_passes_and_a_non_private_one_does_not(tmp_path):
    private = _audited_run(tmp_path, method="dp_sgd", target_epsilon=1.0)
    audited = private["one_run_audit"]
    assert audited["m"] == 1000 and audited["variant"] == "white-box"
    assert audited["steps"] == private["steps"]           # one observation per noised step
    assert audited["epsilon_lower_bound"] <= private["epsilon"]
    leaky = _audited_run(tmp_path, method="non_dp")["one_run_audit"]
    assert leaky["epsilon_lower_bound"] > 2.0


@pytest.mark.slow
def test_a_mechanism_with_too_little_noise_for_its_claimed_epsilon_fails_the_audit(
        tmp_path, monkeypatch):
    real = dp_optimizer._generate_noise

    def a_hundredth(std, reference, **kwargs):      # the bug: σ/100 added, σ accounted
        return real(std=std / 100, reference=reference, **kwargs)

    monkeypatch.setattr(dp_optimizer, "_generate_noise", a_hundredth)
    meta = _audited_run(tmp_path, method="auto_clip", target_epsilon=1.0)
    assert meta["one_run_audit"]["epsilon_lower_bound"] > meta["epsilon"]


def test_non_private_canaries_join_as_one_more_sample_of_the_mean_loss_batch():
    """non_dp: an included canary is sampled like a training sample (q = B/N) and, drawn,
    adds C/B at its coordinate — one more sample's gradient in a batch-mean loss —
    unclipped and un-noised, before the optimizer steps; its score reads the result.
    The private methods sample canaries at the rate the accountant is told, 1/(steps)."""
    torch.manual_seed(0)
    loader = DataLoader(TensorDataset(torch.randn(20, 4), torch.arange(20)), batch_size=4)
    cfg = RunConfig(method="non_dp", epochs=1, batch_size=4, max_grad_norm=0.5,
                    audit_canaries=10)
    dp = build_method(cfg)
    model = nn.Linear(4, 4)
    _, opt, _ = dp.attach(model, torch.optim.SGD(model.parameters(), lr=0.0), loader)
    canaries = dp.canaries
    assert canaries.sample_rate == pytest.approx(4 / 20)
    canaries.sample_rate = 1.0                          # every included canary, this step
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    flat = torch.cat([p.grad.flatten() for p in model.parameters()])
    at = flat[canaries.param * model.weight.numel() + canaries.local]
    expected = torch.where(canaries.included, 0.5 / 4, 0.0)
    torch.testing.assert_close(at, expected)
    assert float(flat.abs().sum()) == pytest.approx(float(expected.sum()))   # nowhere else
    torch.testing.assert_close(canaries.scores, expected.double())
    private, _ = _private_linear("dp_sgd")      # 16 samples in batches of 4: 4 steps
    assert private.canaries.sample_rate == private.accountant_sample_rate == 1 / 4
