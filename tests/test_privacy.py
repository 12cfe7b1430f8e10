"""DP mechanics from first principles: clipping bounds, AC scale, RS masks, noise, ε."""

import math

import numpy as np
import pytest
import torch
from opacus import GradSampleModule
from opacus.accountants import RDPAccountant
from opacus.data_loader import DPDataLoader
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from dpstudy.config import RunConfig
from dpstudy.methods import build_method, random_seed
from dpstudy.privacy.accounting import calibrate_noise, epsilon
from dpstudy.privacy.canaries import GradientCanaries
from dpstudy.privacy.clipping import abadi_factor, automatic_factor
from dpstudy.privacy.conv_grad_sample import conv2d_grad_sample
from dpstudy.privacy.ghost import BookKeepingDPOptimizer, BookKeepingModule
from dpstudy.privacy.optimizer import StudyDPOptimizer
from dpstudy.privacy.sparsification import Sparsifier, cooling_rate, draw_masks, refresh_steps


def _two_layer():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.Linear(5, 3))


def _optimizer(model, **kw):
    defaults = dict(noise_multiplier=0.0, max_grad_norm=1.0, expected_batch_size=1)
    return StudyDPOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), **{**defaults, **kw})


def _set_grad_samples(model, grads):
    for p, g in zip(model.parameters(), grads):
        p.grad_sample = g.clone()


def _random_grad_samples(model, batch, scale, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn((batch, *p.shape), generator=g) * scale for p in model.parameters()]


@pytest.mark.parametrize("per_layer", [False, True])
@pytest.mark.parametrize("clip_fn", ["abadi", "automatic"])
@pytest.mark.parametrize("scale", [1e-3, 1.0, 1e3])
def test_every_clipped_per_sample_gradient_is_within_the_bound(per_layer, clip_fn, scale):
    model = _two_layer()
    bound = 0.7
    grads = _random_grad_samples(model, batch=6, scale=scale)
    for i in range(6):  # one sample at a time: summed_grad is that sample's clipped gradient
        opt = _optimizer(model, max_grad_norm=bound, per_layer=per_layer, clip_fn=clip_fn)
        _set_grad_samples(model, [g[i:i + 1] for g in grads])
        opt.clip_and_accumulate()
        blocks = [p.summed_grad for p in model.parameters()]
        total = torch.sqrt(sum((b ** 2).sum() for b in blocks))
        assert total <= bound * (1 + 1e-6)
        if per_layer:  # each of the L blocks within C/√L
            for b in blocks:
                assert b.norm() <= bound / math.sqrt(len(blocks)) * (1 + 1e-6)


def test_abadi_leaves_small_gradients_alone_and_clips_large_ones():
    norms = torch.tensor([0.1, 0.5, 2.0, 10.0])
    f = abadi_factor(norms, 1.0)
    assert torch.allclose(f[:2], torch.ones(2), atol=1e-5)
    assert torch.allclose(f[2:] * norms[2:], torch.ones(2), atol=1e-5)


def test_automatic_clipping_scale_matches_hand_computed_per_sample_gradients():
    """Linear model, squared loss: g_i = (w·x_i − t_i)·x_i is known in closed form."""
    torch.manual_seed(1)
    w = torch.randn(4)
    x, t = torch.randn(5, 4), torch.randn(5)
    model = nn.Linear(4, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(w[None])
    gsm = GradSampleModule(model, loss_reduction="sum")
    gamma = 0.01
    opt = StudyDPOptimizer(torch.optim.SGD(gsm.parameters(), lr=0.1), noise_multiplier=0.0,
                           max_grad_norm=1.0, expected_batch_size=5, loss_reduction="sum",
                           clip_fn="automatic", gamma=gamma)
    (0.5 * (gsm(x).squeeze(1) - t) ** 2).sum().backward()
    opt.clip_and_accumulate()
    g = (x @ w - t)[:, None] * x                      # per-sample gradients by hand
    expected = (g / (g.norm(dim=1, keepdim=True) + gamma)).sum(0)
    assert torch.allclose(model.weight.summed_grad[0], expected, atol=1e-5)
    # AUTO-V: pure normalisation, every sample contributes a unit vector
    assert torch.allclose(automatic_factor(g.norm(dim=1), 1.0, 0.0) * g.norm(dim=1),
                          torch.ones(5), atol=1e-6)


def test_random_sparsification_zeroes_masked_coordinates_in_gradient_and_noise():
    model = _two_layer()
    shapes = [p.shape for p in model.parameters()]
    sp = Sparsifier(shapes, final_rate=0.6, refresh=1, epochs=1, seed=3)
    sp.maybe_refresh(epoch=0, step=0, steps_per_epoch=4)
    assert sp.rate == 0.6
    opt = _optimizer(model, noise_multiplier=2.0, sparsifier=sp, expected_batch_size=4)
    _set_grad_samples(model, _random_grad_samples(model, batch=4, scale=5.0))
    opt.clip_and_accumulate()
    opt.add_noise()
    for p, m in zip(model.parameters(), sp.masks):
        assert (p.summed_grad[m == 0] == 0).all()       # gradient masked
        assert (p.grad[m == 0] == 0).all()              # noise masked
        assert (p.grad[m == 1] != 0).all()              # kept coordinates noised
        assert int((m == 0).sum()) == round(0.6 * p.numel())


def test_sparsification_masks_before_the_norm_is_taken():
    """A gradient whose mass sits on masked coordinates must not be clipped for it."""
    model = nn.Linear(4, 1, bias=False)
    sp = Sparsifier([model.weight.shape], final_rate=0.5, refresh=1, epochs=1, seed=0)
    sp.maybe_refresh(0, 0, 1)
    mask = sp.masks[0]
    g = torch.where(mask == 0, torch.full_like(mask, 100.0), torch.full_like(mask, 0.1))
    opt = _optimizer(model, max_grad_norm=1.0, sparsifier=sp)
    model.weight.grad_sample = g[None].clone()
    opt.clip_and_accumulate()
    # masked first: the kept part has norm 0.1·√2 < C, so it passes unclipped
    assert torch.allclose(model.weight.summed_grad, g * mask, atol=1e-6)


def test_cooling_schedule_matches_the_formula():
    final, refresh, epochs = 0.9, 2, 5
    rates = [cooling_rate(final, e, k, refresh, epochs) for e in range(epochs)
             for k in range(refresh)]
    expected = [min(final, final * i / (refresh * epochs - 1)) for i in range(refresh * epochs)]
    assert np.allclose(rates, expected)
    assert rates[0] == 0.0 and rates[-1] == pytest.approx(final)
    assert cooling_rate(0.9, 0, 0, 1, 1) == 0.9
    assert refresh_steps(10, 2) == [0, 5]


def test_masks_have_exact_sparsity_and_are_reproducible():
    shapes = [torch.Size([10, 10]), torch.Size([7])]
    a = draw_masks(shapes, 0.3, torch.Generator().manual_seed(5))
    b = draw_masks(shapes, 0.3, torch.Generator().manual_seed(5))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert [int((m == 0).sum()) for m in a] == [30, 2]


def test_cooling_and_refresh_steps_at_their_edges():
    """Two masks in the whole run: the first at rate 0, the last at r*. Refresh steps
    are whole step indices even when the epoch does not split evenly."""
    assert [cooling_rate(0.9, 0, k, 2, 1) for k in range(2)] == [0.0, 0.9]
    assert [cooling_rate(0.9, e, 0, 1, 2) for e in range(2)] == [0.0, 0.9]
    starts = refresh_steps(7, 2)
    assert starts == [0, 3] and all(type(s) is int for s in starts)


def test_sparsifier_masks_come_from_its_own_seed_alone():
    """The masks are data-independent and reproducible: the global RNG (which data
    loading and initialisation use) never changes them; another seed does."""
    shapes = [torch.Size([6, 5]), torch.Size([5])]
    draws = []
    for global_seed, seed in [(0, 4), (1, 4), (0, 5)]:
        torch.manual_seed(global_seed)
        sp = Sparsifier(shapes, final_rate=0.5, refresh=2, epochs=1, seed=seed)
        assert sp.masks is None and sp.rate == 0.0      # no mask before the first refresh
        sp.maybe_refresh(0, 0, 4)
        sp.maybe_refresh(0, 2, 4)                       # the second mask of the epoch
        draws.append(sp.masks)
    assert all(torch.equal(a, b) for a, b in zip(draws[0], draws[1]))
    assert not all(torch.equal(a, b) for a, b in zip(draws[0], draws[2]))


def test_an_optimizer_clips_unmasked_before_the_first_mask():
    model = nn.Linear(4, 1, bias=False)
    sp = Sparsifier([model.weight.shape], final_rate=0.5, refresh=1, epochs=1, seed=0)
    opt = _optimizer(model, max_grad_norm=1.0, sparsifier=sp)
    model.weight.grad_sample = torch.full((1, 1, 4), 2.0)
    opt.clip_and_accumulate()
    assert torch.allclose(model.weight.summed_grad, torch.full((1, 4), 0.5))


def test_noise_has_standard_deviation_sigma_c_over_b_on_a_zero_gradient_model():
    """Through the real make_private path: zero data gradients, so p.grad is pure noise."""
    torch.manual_seed(0)
    n, batch, sigma, clip = 64, 8, 1.3, 0.5
    data = TensorDataset(torch.zeros(n, 1, 16, 16), torch.zeros(n, 16, 16, dtype=torch.long))
    loader = DataLoader(data, batch_size=batch)
    model = nn.Sequential(nn.Conv2d(1, 64, 3, padding=1, bias=False),
                          nn.Conv2d(64, 64, 3, padding=1, bias=False))
    cfg = RunConfig(method="dp_sgd", noise_multiplier=sigma, max_grad_norm=clip,
                    image_size=(16, 16), epochs=1, batch_size=batch)
    method = build_method(cfg)
    model, opt, dp_loader = method.attach(model, torch.optim.SGD(model.parameters(), lr=0.1),
                                          loader)
    assert isinstance(dp_loader, DPDataLoader)          # Poisson sampling loader
    x, _ = next(iter(dp_loader))
    opt.zero_grad()
    (model(x) * 0.0).sum().backward()
    opt.step()
    noise = torch.cat([p.grad.flatten() for p in model.parameters()])
    expected = sigma * clip / batch
    assert noise.numel() > 30000
    assert abs(float(noise.std()) / expected - 1) < 0.02
    assert abs(float(noise.mean())) < 3 * expected / math.sqrt(noise.numel())


@pytest.mark.parametrize("q,sigma,steps", [(0.01, 1.0, 1000), (0.1, 0.5, 50), (0.25, 2.0, 200)])
def test_epsilon_matches_an_independent_rdp_accountant(q, sigma, steps):
    acc = RDPAccountant()
    for _ in range(steps):
        acc.step(noise_multiplier=sigma, sample_rate=q)
    assert epsilon(q, sigma, steps, 1e-5) == pytest.approx(acc.get_epsilon(1e-5), rel=1e-9)


def test_calibrated_noise_reaches_the_target_epsilon():
    sigma = calibrate_noise(3.0, 0.1, 300, 1e-5)
    assert epsilon(0.1, sigma, 300, 1e-5) <= 3.0
    assert epsilon(0.1, sigma * 0.97, 300, 1e-5) > 3.0 - 0.05


def test_augmentation_copies_are_averaged_before_clipping():
    """K adjacent copies form one sample: its averaged gradient is clipped once."""
    model = nn.Linear(3, 1, bias=False)
    g = torch.tensor([[3.0, 0.0, 0.0], [1.0, 0.0, 0.0],      # sample 0: mean (2, 0, 0)
                      [0.0, 0.1, 0.0], [0.0, 0.3, 0.0]])     # sample 1: mean (0, .2, 0)
    opt = _optimizer(model, max_grad_norm=1.0, aug_multiplicity=2, expected_batch_size=2)
    model.weight.grad_sample = g[:, None, :].clone()
    opt.clip_and_accumulate()
    expected = torch.tensor([1.0, 0.2, 0.0])   # (2,0,0) clipped to norm 1, (0,.2,0) kept
    assert torch.allclose(model.weight.summed_grad[0], expected, atol=1e-5)
    assert len(opt.norm_log[0]) == 2            # two samples, not four copies


def test_noise_masks_and_canaries_each_draw_from_their_own_documented_stream():
    """Seeded: stream k is seed + k (1 noise, 2 masks, 4 canaries), so a run is
    reproducible from its config and no two streams share a seed (masks drawn from the
    augmentation's stream would be correlated with it). ``os_entropy``: fresh each run."""
    cfg = RunConfig(method="random_sparsification", noise_multiplier=1.0, seed=7, epochs=1,
                    batch_size=4, final_rate=0.5, audit_canaries=6,
                    grad_sample_mode="native_conv")
    assert [random_seed(cfg, k) for k in range(6)] == [7, 8, 9, 10, 11, 12]
    loader = DataLoader(TensorDataset(torch.zeros(16, 6)), batch_size=4)
    model = _two_layer()
    shapes = [p.shape for p in model.parameters()]
    dp = build_method(cfg)
    _, opt, _ = dp.attach(model, torch.optim.SGD(model.parameters(), lr=0.1), loader)
    assert torch.equal(opt.generator.get_state(), torch.Generator().manual_seed(8).get_state())
    assert torch.equal(dp.sparsifier.generator.get_state(),
                       torch.Generator().manual_seed(9).get_state())
    own = GradientCanaries(shapes, 6, cfg.max_grad_norm, 0.25, seed=11)
    for name in ("param", "local", "included"):
        assert torch.equal(getattr(dp.canaries, name), getattr(own, name))
    fresh = cfg.replace(randomness="os_entropy")
    assert len({random_seed(fresh, 1) for _ in range(5)} | {random_seed(cfg, 1)}) == 6


def test_a_non_private_method_reports_no_privacy_parameters():
    """non_dp: no σ, q or units to record, no audit without canaries, and the statistics of
    a private epoch all missing (NaN; no steps)."""
    dp = build_method(RunConfig(method="non_dp"))
    model = _two_layer()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loader = DataLoader(TensorDataset(torch.zeros(8, 6)), batch_size=4)
    assert dp.attach(model, opt, loader) == (model, opt, loader)
    assert (dp.noise_multiplier, dp.sample_rate, dp.n_units, dp.canaries) == (None,) * 4
    assert dp.canary_audit() is None
    stats = dp.epoch_stats()
    assert stats.pop("steps") is None
    assert sorted(stats) == ["clipped_fraction", "epsilon", "grad_norm_median", "sparsity"]
    assert all(math.isnan(v) for v in stats.values())


@pytest.mark.parametrize("mode", ["hooks", "functorch", "native_conv", "ghost_mixed"])
def test_each_grad_sample_mode_builds_the_machinery_it_names(mode):
    """hooks: Opacus's samplers; functorch: functorch for every layer; native_conv:
    Opacus's hooks with dpstudy's convolution sampler (same gradients, so only this shows
    it); ghost_mixed: the book-keeping model and optimizer."""
    cfg = RunConfig(method="dp_sgd", noise_multiplier=1.0, epochs=1, batch_size=4,
                    grad_sample_mode=mode)
    model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.GroupNorm(1, 2))
    loader = DataLoader(TensorDataset(torch.zeros(8, 1, 4, 4)), batch_size=4)
    wrapped, opt, _ = build_method(cfg).attach(
        model, torch.optim.SGD(model.parameters(), lr=0.1), loader)
    if mode == "ghost_mixed":
        assert type(wrapped) is BookKeepingModule and type(opt) is BookKeepingDPOptimizer
        return
    assert type(wrapped) is GradSampleModule and type(opt) is StudyDPOptimizer
    assert wrapped.force_functorch == (mode == "functorch")
    assert (wrapped.GRAD_SAMPLERS[nn.Conv2d] is conv2d_grad_sample) == (mode == "native_conv")
