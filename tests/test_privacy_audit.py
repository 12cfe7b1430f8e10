"""Statistical audit of the privacy mechanism as it runs, not as it is documented.

The real :class:`StudyDPOptimizer`, built through ``build_method(cfg).attach`` (the same
``make_private`` path training uses), is stepped thousands of times on per-sample
gradients fixed by the test. Each noised update must then be a draw from
N(Σ clip(g_i)/B, (σC/B)² I) on the kept coordinates and exactly 0 on masked ones. The
tolerances are the quantiles of the statistics' exact distributions (χ², normal), at
level α with a Bonferroni correction; seeds are fixed, so the tests are deterministic.
Each check is also shown to reject updates of a wrong noise scale.
"""

import math

import numpy as np
import pytest
import torch
from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.data_loader import DPDataLoader
from scipy import stats
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from dpstudy.config import RunConfig
from dpstudy.methods import build_method
from dpstudy.models import build_model
from dpstudy.privacy.accounting import epsilon
from dpstudy.train import _train_epoch

N, BATCH = 16, 4          # data set size and expected batch: sample rate q = 1/4
REPS = 2000               # noised updates per mechanism
ALPHA = 1e-4              # family-wise level of each statistical check
NORMS = [0.3, 0.9, 2.5, 6.0]   # per-sample gradient norms: inside and outside every bound


def _attach(method: str, **fields):
    """A 20-parameter linear model made private exactly as training does it."""
    torch.manual_seed(0)
    data = TensorDataset(torch.randn(N, 4), torch.arange(N))
    loader = DataLoader(data, batch_size=BATCH, generator=torch.Generator().manual_seed(0))
    cfg = RunConfig(method=method, epochs=1, batch_size=BATCH, **fields)
    dp = build_method(cfg)
    model = nn.Linear(4, 4)
    model, opt, dp_loader = dp.attach(model, torch.optim.SGD(model.parameters(), lr=0.0), loader)
    return dp, model, opt, dp_loader


def _per_sample_gradients(copies: int = 1, seed: int = 7) -> np.ndarray:
    """[B·copies, 20] gradients, a sample's copies adjacent; sample i's mean has norm NORMS[i]."""
    rng = np.random.default_rng(seed)
    g = rng.standard_normal((BATCH, 20))
    g = g / np.linalg.norm(g, axis=1, keepdims=True) * np.array(NORMS)[:, None]
    spread = rng.standard_normal((BATCH, copies, 20))
    return (g[:, None] + spread - spread.mean(1, keepdims=True)).reshape(-1, 20)


def _noised_updates(opt, grads: np.ndarray, reps: int = REPS) -> np.ndarray:
    """``reps`` outputs of clip_and_accumulate → add_noise → scale_grad on fixed g_i."""
    sizes = [p.numel() for p in opt.params]
    blocks = np.split(grads, np.cumsum(sizes)[:-1], axis=1)
    out = np.empty((reps, grads.shape[1]))
    for r in range(reps):
        for p, g in zip(opt.params, blocks):
            p.grad_sample = torch.tensor(g, dtype=p.dtype).view(len(g), *p.shape)
        opt.clip_and_accumulate()
        opt.add_noise()
        opt.scale_grad()
        out[r] = torch.cat([p.grad.flatten() for p in opt.params]).double().numpy()
        opt.zero_grad(set_to_none=True)
    return out


def _gaussian_misfit(updates: np.ndarray, mean: np.ndarray, std: float) -> list[str]:
    """Which checks reject ``updates ~ N(mean, std² I)`` (empty list: none)."""
    n, k = updates.shape
    failed = []
    m_hat = updates.mean(0)
    if ((m_hat - mean) ** 2).sum() / (std ** 2 / n) > stats.chi2.ppf(1 - ALPHA, k):
        failed.append("mean")
    cov = np.cov(updates, rowvar=False)
    total = (n - 1) * np.trace(cov) / std ** 2            # ~ χ²(k(n-1))
    dof = k * (n - 1)
    if not stats.chi2.ppf(ALPHA / 2, dof) < total < stats.chi2.ppf(1 - ALPHA / 2, dof):
        failed.append("total variance")
    each = (n - 1) * np.diag(cov) / std ** 2              # each ~ χ²(n-1)
    a = ALPHA / (2 * k)
    if not ((stats.chi2.ppf(a, n - 1) < each) & (each < stats.chi2.ppf(1 - a, n - 1))).all():
        failed.append("coordinate variance")
    corr = np.corrcoef(updates, rowvar=False)[np.triu_indices(k, 1)]
    pairs = k * (k - 1) // 2                              # √n·r ≈ N(0, 1) when independent
    if np.abs(corr).max() * math.sqrt(n) > stats.norm.ppf(1 - ALPHA / (2 * pairs)):
        failed.append("correlation")
    return failed


def _abadi(g: np.ndarray, bound: float) -> np.ndarray:
    return g * np.minimum(1.0, bound / np.linalg.norm(g, axis=1, keepdims=True))


# (method fields, expected clipped per-sample gradients as a function of (g, masks))
MECHANISMS = {
    "dp_sgd flat": (dict(method="dp_sgd", noise_multiplier=0.8, max_grad_norm=1.5),
                    lambda g, keep: _abadi(g, 1.5)),
    "dp_sgd per_layer": (dict(method="dp_sgd", noise_multiplier=0.8, max_grad_norm=1.5,
                              clipping="per_layer"),
                         lambda g, keep: np.hstack([_abadi(g[:, :16], 1.5 / math.sqrt(2)),
                                                    _abadi(g[:, 16:], 1.5 / math.sqrt(2))])),
    "auto_clip": (dict(method="auto_clip", noise_multiplier=0.8, max_grad_norm=1.0, gamma=0.3),
                  lambda g, keep: g / (np.linalg.norm(g, axis=1, keepdims=True) + 0.3)),
    "random_sparsification": (dict(method="random_sparsification", noise_multiplier=0.8,
                                   max_grad_norm=1.5, final_rate=0.5),
                              lambda g, keep: _abadi(g * keep, 1.5)),
    # augmentation multiplicity: K copies of a sample are averaged, then clipped once
    "dp_sgd 3 augmented copies": (dict(method="dp_sgd", noise_multiplier=0.8, max_grad_norm=1.5,
                                       augment=True, aug_multiplicity=3),
                                  lambda g, keep: _abadi(g, 1.5)),
}


@pytest.mark.parametrize("name", MECHANISMS)
def test_noised_update_is_gaussian_around_the_clipped_mean(name):
    fields, clipped = MECHANISMS[name]
    dp, _, opt, _ = _attach(**fields)
    if fields["method"] == "random_sparsification":
        dp.before_step(epoch=0, step=0, steps_per_epoch=N // BATCH)   # draws the one mask
        keep = torch.cat([m.flatten() for m in dp.sparsifier.masks]).numpy().astype(bool)
        assert keep.sum() == 8 + 2                     # exactly half of 16 and of 4 kept
    else:
        keep = np.ones(20, bool)
    assert opt.expected_batch_size == BATCH                # samples, not augmented copies
    copies = fields.get("aug_multiplicity", 1)
    updates = _noised_updates(opt, _per_sample_gradients(copies))
    g = _per_sample_gradients(copies).reshape(BATCH, copies, 20).mean(1)
    mean = clipped(g, keep).sum(0) / BATCH
    std = fields["noise_multiplier"] * fields["max_grad_norm"] / BATCH   # σC/B
    # masked coordinates: neither gradient nor noise, in every single update
    assert (updates[:, ~keep] == 0).all()
    assert _gaussian_misfit(updates[:, keep], mean[keep], std) == []
    # the same checks reject the classic scale mistakes: σC (no /B), σC/√B, σ (no C)
    for wrong in (std * BATCH, std * math.sqrt(BATCH), std / fields["max_grad_norm"]):
        if not math.isclose(wrong, std):
            assert "total variance" in _gaussian_misfit(updates[:, keep], mean[keep], wrong)
    # ... and a mean computed without clipping
    assert "mean" in _gaussian_misfit(updates[:, keep], (g * keep).sum(0)[keep] / BATCH, std)


def test_poisson_loader_samples_at_the_recorded_rate_with_variable_and_empty_batches():
    dp, model, opt, loader = _attach("dp_sgd", noise_multiplier=1.0)
    assert isinstance(loader, DPDataLoader)
    q = dp.sample_rate
    assert q == loader.sample_rate == BATCH / N
    sizes, seen, empty = [], np.zeros(N, int), None
    for _ in range(250):                               # 250 epochs of 4 batches
        for x, idx in loader:
            sizes.append(len(x))
            np.add.at(seen, idx.numpy(), 1)
            if len(x) == 0:
                empty = (x, idx)
    batches, sizes = len(sizes), np.array(sizes)
    assert batches == 1000
    # every sample is drawn independently with probability q in every batch
    assert stats.binomtest(int(sizes.sum()), N * batches, q).pvalue > 1e-3
    assert all(stats.binomtest(int(c), batches, q).pvalue > 1e-3 / N for c in seen)
    # batch sizes follow Binomial(N, q): not fixed, and empty with probability (1-q)^N
    assert len(set(sizes)) > 5
    assert stats.binomtest(int((sizes == 0).sum()), batches, (1 - q) ** N).pvalue > 1e-3
    pmf = stats.binom.pmf(np.arange(N + 1), N, q)
    observed = np.bincount(sizes, minlength=N + 1)
    top = 9                                            # bins 9..16 pooled: expected ≥ 5
    obs = np.append(observed[:top], observed[top:].sum())
    exp = np.append(pmf[:top], pmf[top:].sum()) * batches
    assert stats.chisquare(obs, exp).pvalue > 1e-3
    # an empty batch is still a step: pure noise, counted by the accountant
    assert empty is not None and empty[0].shape == (0, 4)
    opt.zero_grad()
    model(empty[0]).sum().backward()
    opt.step()
    noise = torch.cat([p.grad.flatten() for p in model.parameters()])
    assert (noise != 0).all()
    assert dp.engine.accountant.history == [(1.0, q, 1)]


@pytest.mark.parametrize("mode", ["hooks", "functorch", "native_conv", "ghost_mixed"])
def test_the_training_loop_takes_a_noise_only_step_on_an_empty_batch(mode):
    """P(empty) = (1-q)^N is 1/16 per step for batch 2 of 4, 0.13 for batch 2 of Duke's 66."""
    cfg = RunConfig(method="dp_sgd", noise_multiplier=1.0, image_size=(16, 16), base_width=8,
                    depth=2, epochs=1, batch_size=2, grad_sample_mode=mode)
    data = TensorDataset(torch.randn(4, 1, 16, 16), torch.randint(0, 9, (4, 16, 16)))
    net = build_model("unet", 8, 2)
    dp = build_method(cfg)
    model, opt, _ = dp.attach(net, torch.optim.SGD(net.parameters(), lr=0.1),
                              DataLoader(data, batch_size=2))
    before = [p.detach().clone() for p in model.parameters()]
    empty = (torch.zeros(0, 1, 16, 16), torch.zeros(0, 16, 16, dtype=torch.long))
    _, steps = _train_epoch(model, opt, [empty], dp, lambda: None, 0, cfg, False, None)
    assert steps == 1 and dp.engine.accountant.history == [(1.0, 0.5, 1)]
    assert all((p != b).any() for p, b in zip(model.parameters(), before))   # noise applied
    _, steps = _train_epoch(model, opt, [data[:2], empty], dp, lambda: None, 0, cfg, False, None)
    assert steps == 2 and dp.engine.accountant.history == [(1.0, 0.5, 3)]


def _stepped(accountant, q: float, sigma: float, steps: int, delta: float) -> float:
    for _ in range(steps):
        accountant.step(noise_multiplier=sigma, sample_rate=q)
    return accountant.get_epsilon(delta=delta)


@pytest.mark.parametrize("q,sigma,steps,delta", [
    (0.5, 1.0, 6, 1e-5),          # the tiny test runs: batch 2 of 4, 3 epochs
    (0.25, 0.6, 40, 1e-5),
    (0.1, 0.8, 300, 1e-6),
    (0.03, 1.2, 1500, 1e-5),      # Duke: batch 2 of 66, ~45 epochs
    (1.0, 4.0, 10, 1e-5),         # no subsampling
    (0.004, 2.0, 2500, 1e-7),
    (0.2, 0.3, 1, 1e-5),          # one step, very little noise
])
def test_reported_epsilon_equals_an_rdp_accountant_stepped_one_step_at_a_time(q, sigma, steps,
                                                                              delta):
    assert epsilon(q, sigma, steps, delta) == pytest.approx(
        _stepped(RDPAccountant(), q, sigma, steps, delta), rel=1e-9)


def test_reported_prv_epsilon_equals_a_stepped_prv_accountant():
    q, sigma, steps, delta = 0.05, 1.0, 200, 1e-5
    assert epsilon(q, sigma, steps, delta, accountant="prv") == pytest.approx(
        _stepped(PRVAccountant(), q, sigma, steps, delta), rel=1e-6)


def test_epsilon_grows_with_steps_and_falls_with_noise():
    q, delta = 0.1, 1e-5
    by_steps = [epsilon(q, 1.0, s, delta) for s in (0, 1, 2, 10, 100, 1000)]
    assert by_steps[0] == 0.0 and all(a < b for a, b in zip(by_steps, by_steps[1:]))
    by_sigma = [epsilon(q, s, 100, delta) for s in (0.5, 0.7, 1.0, 2.0, 5.0)]
    assert all(a > b for a, b in zip(by_sigma, by_sigma[1:]))
    assert epsilon(0.2, 1.0, 100, delta) > epsilon(q, 1.0, 100, delta)   # and grows with q
