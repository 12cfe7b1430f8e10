"""Exact clip factors, clipping statistics and clipped updates on hand-made gradients.

Every expected number is worked out by hand from the formulas (Abadi: min(1, C/‖g‖);
Automatic Clipping: R/(‖g‖+γ); per-layer: bound C/√L per tensor; Random
Sparsification: mask before the norm), at bounds other than 1 and with norms exactly
on the bound. A factor right only at R = 1, a statistic off by one comparison or
computed as the wrong average, or a method that silently swaps its clip function
fails here.
"""

import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from dpstudy.config import RunConfig
from dpstudy.methods import build_method
from dpstudy.privacy.clipping import abadi_factor, automatic_factor, clip_factor
from dpstudy.privacy.optimizer import StudyDPOptimizer

S2 = math.sqrt(2)

# Per-sample gradients of a model with L = 4 parameter tensors of sizes 3, 1, 1, 1
# (so a per-layer bound C/√L is C/2, exactly). Total norms 1, 3, 4, 2, 2√2, 10.
GRADS = np.array([
    [1, 0, 0, 0, 0, 0],      # inside every bound
    [0, 3, 0, 0, 0, 0],      # ‖g‖ + γ = R: Automatic Clipping's factor exactly 1
    [0, 0, 4, 0, 0, 0],      # ‖g‖ = C: on the flat bound
    [1, 1, 1, 1, 0, 0],      # blocks √3 and 1
    [0, 0, 0, 2, 2, 0],      # blocks 2 and 2: on the per-layer bound C/2
    [0, 6, 0, 0, 0, 8],      # outside every bound
], dtype=np.float64)
SIZES = [3, 1, 1, 1]
C, GAMMA = 4.0, 1.0          # flat bound C (Abadi) = R (Automatic Clipping)
MEDIAN = (2 * S2 + 3) / 2    # of 1, 2, 2√2, 3, 4, 10: the two middle values averaged

# Hand-computed factor of each sample (flat) or of each sample's block (per-layer).
CASES = {
    ("abadi", False): ([1, 1, 1, 1, 1, 4 / 10], 1 / 6),
    ("abadi", True): ([[1, 1, 1, 1], [2 / 3, 1, 1, 1], [1 / 2, 1, 1, 1], [1, 1, 1, 1],
                       [1, 1, 1, 1], [1 / 3, 1, 1, 2 / 8]], 3 / 6),
    # Automatic Clipping rescales every gradient: no clipped fraction (NaN)
    ("automatic", False): ([4 / 2, 4 / 4, 4 / 5, 4 / 3, 4 / (2 * S2 + 1), 4 / 11], math.nan),
    ("automatic", True): ([[1, 2, 2, 2], [2 / 4, 2, 2, 2], [2 / 5, 2, 2, 2],
                           [2 / (math.sqrt(3) + 1), 2 / 2, 2, 2], [2, 2 / 3, 2 / 3, 2],
                           [2 / 7, 2, 2, 2 / 9]], math.nan),
}


def _four_tensor_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 1), nn.Linear(1, 1))


def _set_grad_samples(params, grads: np.ndarray) -> None:
    blocks = np.split(grads, np.cumsum([p.numel() for p in params])[:-1], axis=1)
    for p, g in zip(params, blocks):
        p.grad_sample = torch.tensor(g, dtype=p.dtype).view(len(g), *p.shape)


def _flat(tensors) -> np.ndarray:
    return torch.cat([t.detach().flatten() for t in tensors]).double().numpy()


@pytest.mark.parametrize("bound", [0.25, 1.0, 4.0])
@pytest.mark.parametrize("gamma", [0.0, 0.01, 1.0])
def test_automatic_factor_is_r_over_norm_plus_gamma_at_every_r_and_gamma(bound, gamma):
    norms = torch.tensor([0.5, 1.0, 3.0, 10.0])
    expected = torch.tensor([bound / (n + gamma) for n in (0.5, 1.0, 3.0, 10.0)])
    torch.testing.assert_close(automatic_factor(norms, bound, gamma), expected,
                               rtol=1e-6, atol=0)
    torch.testing.assert_close(clip_factor("automatic", norms, bound, gamma), expected,
                               rtol=1e-6, atol=0)
    # a zero gradient: R/γ under AUTO-S; 0, not 0/0, under AUTO-V
    zero = automatic_factor(torch.zeros(1), bound, gamma)
    assert float(zero) == (bound / gamma if gamma else 0.0)


@pytest.mark.parametrize("bound", [0.25, 1.0, 4.0])
def test_abadi_factor_is_exactly_one_up_to_the_bound_and_c_over_norm_beyond(bound):
    norms = torch.tensor([0.0, 0.5, 1.0, 2.0, 8.0]) * bound
    expected = torch.tensor([1.0, 1.0, 1.0, 0.5, 0.125])
    assert torch.equal(abadi_factor(norms, bound), expected)
    assert torch.equal(clip_factor("abadi", norms, bound, 0.3), expected)
    with pytest.raises(ValueError, match="unknown clip function 'flat'"):
        clip_factor("flat", norms, bound, 0.3)


@pytest.mark.parametrize("clip_fn,per_layer", CASES)
def test_clipped_sum_and_statistics_of_hand_made_gradients(clip_fn, per_layer):
    """Two steps' worth of samples: the sum accumulates, the statistics span both."""
    model = _four_tensor_model()
    params = list(model.parameters())
    opt = StudyDPOptimizer(torch.optim.SGD(params, lr=0.1), noise_multiplier=0.0,
                           max_grad_norm=C, expected_batch_size=6, clip_fn=clip_fn,
                           gamma=GAMMA, per_layer=per_layer)
    for part in (GRADS[:4], GRADS[4:]):
        _set_grad_samples(params, part)
        opt.clip_and_accumulate()
    factors, clipped = CASES[clip_fn, per_layer]
    factors = np.array(factors, dtype=np.float64)
    if per_layer:             # one factor per block, spread over the block's coordinates
        factors = np.repeat(factors, SIZES, axis=1)
    else:
        factors = factors[:, None]
    expected = (factors * GRADS).sum(0)
    np.testing.assert_allclose(_flat(p.summed_grad for p in params), expected, rtol=1e-6)
    stats = opt.pop_grad_stats()
    assert stats["grad_norm_median"] == pytest.approx(MEDIAN, rel=1e-6)
    assert stats["clipped_fraction"] == pytest.approx(clipped, abs=1e-6, nan_ok=True)  # 1/6 a sample
    # popped: the next epoch starts from nothing, and an epoch without units has the same
    # statistics, missing
    empty = opt.pop_grad_stats()
    assert sorted(empty) == ["clipped_fraction", "grad_norm_median"]
    assert all(math.isnan(v) for v in empty.values())


def _rs_reference(grads, masks, clip_fn, bound, gamma, sizes, per_layer):
    """The clipped sum by the paper's recipe, in numpy: mask, then norm, then clip."""
    g = grads * np.concatenate([m.flatten().numpy() for m in masks])
    edges = np.cumsum(sizes)[:-1]
    blocks = np.split(g, edges, axis=1)
    norms = (np.stack([np.linalg.norm(b, axis=1) for b in blocks], axis=1) if per_layer
             else np.linalg.norm(g, axis=1, keepdims=True))
    b = bound / math.sqrt(len(sizes)) if per_layer else bound
    f = np.minimum(1.0, b / np.maximum(norms, 1e-300)) if clip_fn == "abadi" else b / (norms + gamma)
    f = np.repeat(f, sizes, axis=1) if per_layer else f
    return (f * g).sum(0)


@pytest.mark.parametrize("clipping", ["flat", "per_layer"])
@pytest.mark.parametrize("method,clip_fn", [("dp_sgd", "abadi"), ("auto_clip", "automatic"),
                                            ("random_sparsification", "abadi"),
                                            ("random_sparsification", "automatic")])
def test_each_method_takes_its_hand_computed_step(method, clip_fn, clipping):
    """Through ``build_method(cfg).attach``: the clip function each method applies
    (Random Sparsification: the one it is configured with), at R ≠ 1 and γ ≠ 0.01.
    Noise is switched off after attaching so the whole SGD step is exact; its scale is
    the statistical audit's subject (test_privacy_audit.py)."""
    n, batch, lr, bound, gamma = 12, 6, 0.5, 3.0, 0.2
    rs = method == "random_sparsification"
    cfg = RunConfig(method=method, noise_multiplier=1.0, max_grad_norm=bound, gamma=gamma,
                    clipping=clipping, epochs=1, batch_size=batch,
                    **(dict(clip_fn=clip_fn, final_rate=0.5) if rs else {}))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 2), nn.Linear(2, 1))
    loader = DataLoader(TensorDataset(torch.zeros(n, 8)), batch_size=batch)
    dp = build_method(cfg)
    model, opt, _ = dp.attach(model, torch.optim.SGD(model.parameters(), lr=lr), loader)
    dp.before_step(epoch=0, step=0, steps_per_epoch=2)
    params = list(model.parameters())
    sizes = [p.numel() for p in params]
    masks = dp.sparsifier.masks if rs else [torch.ones(s) for s in sizes]
    if rs:
        assert [int((m == 0).sum()) for m in masks] == [8, 1, 1, 0]   # round(0.5·n) each
    rng = np.random.default_rng(3)
    grads = rng.standard_normal((batch, sum(sizes)))
    grads *= np.array([0.1, 0.5, 2.0, 3.0, 5.0, 40.0])[:, None] / np.linalg.norm(grads, axis=1,
                                                                               keepdims=True)
    _set_grad_samples(params, grads)
    before = _flat(params)
    opt.noise_multiplier = 0.0
    opt.step()
    summed = _rs_reference(grads, masks, clip_fn, bound, gamma, sizes, clipping == "per_layer")
    np.testing.assert_allclose(_flat(params), before - lr * summed / batch, rtol=1e-5, atol=1e-7)
    if rs:   # the recorded sparsity is that of the masks in force: half the coordinates
        assert dp.epoch_stats()["sparsity"] == 0.5


def test_statistics_of_a_single_unit_are_its_own():
    """One unit in an epoch: the median is its norm, the clipped fraction 0 or 1."""
    model = _four_tensor_model()
    params = list(model.parameters())
    opt = StudyDPOptimizer(torch.optim.SGD(params, lr=0.1), noise_multiplier=0.0,
                           max_grad_norm=C, expected_batch_size=1)
    _set_grad_samples(params, GRADS[5:])                 # norm 10 > C
    opt.clip_and_accumulate()
    assert opt.pop_grad_stats() == {"grad_norm_median": pytest.approx(10.0),
                                    "clipped_fraction": 1.0}


def test_automatic_clipping_without_gamma_is_auto_s():
    """Built without γ, Automatic Clipping is Bu et al.'s AUTO-S, γ = 0.01 (as a run's
    default): each gradient scaled by R/(‖g‖ + 0.01)."""
    model = _four_tensor_model()
    params = list(model.parameters())
    opt = StudyDPOptimizer(torch.optim.SGD(params, lr=0.1), noise_multiplier=0.0,
                           max_grad_norm=C, expected_batch_size=1, clip_fn="automatic")
    assert RunConfig().gamma == 0.01
    _set_grad_samples(params, GRADS[2:3])                # norm 4
    opt.clip_and_accumulate()
    np.testing.assert_allclose(_flat(p.summed_grad for p in params),
                               GRADS[2] * C / (4 + 0.01), rtol=1e-6)


def test_per_sample_and_summed_gradients_are_used_once():
    """Opacus's guard survives the overridden steps: clipping the same per-sample
    gradients again (no backward in between) or noising the same clipped sum again
    raises, rather than counting a sample twice."""
    model = _four_tensor_model()
    params = list(model.parameters())
    opt = StudyDPOptimizer(torch.optim.SGD(params, lr=0.1), noise_multiplier=1.0,
                           max_grad_norm=C, expected_batch_size=1)
    _set_grad_samples(params, GRADS[:2])
    opt.clip_and_accumulate()
    with pytest.raises(ValueError, match="call optimizer.zero_grad"):
        opt.clip_and_accumulate()
    opt.add_noise()
    with pytest.raises(ValueError, match="call optimizer.zero_grad"):
        opt.add_noise()
