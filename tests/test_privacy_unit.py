"""Subject-level privacy (``privacy_unit=subject``) from first principles: whole subjects
sampled at rate q, one clipped gradient per subject whatever its number of B-scans,
sensitivity C per subject, and ε accounted over subjects."""

import json

import numpy as np
import pytest
import torch
from opacus.accountants import RDPAccountant
from scipy.stats import binomtest
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from _runs import make_duke
from dpstudy.config import HASH_NEUTRAL_DEFAULTS, RunConfig
from dpstudy.data.duke import load_split
from dpstudy.data.units import UnitPoissonSampler, group_by_unit, unit_loader, unit_of
from dpstudy.errors import ConfigError, DataError
from dpstudy.methods import build_method
from dpstudy.privacy.optimizer import StudyDPOptimizer
from dpstudy.privacy.sparsification import Sparsifier
from dpstudy.train import train


class NamedData(TensorDataset):
    """A dataset with B-scan names, as SegmentationDataset has."""

    def __init__(self, names, *tensors):
        super().__init__(*tensors)
        self.names = names


def _names(sizes):
    return [f"Subject_{s + 1:02d}_{k:02d}" for s, n in enumerate(sizes) for k in range(n)]


def _optimizer(model, sizes, **kw):
    """StudyDPOptimizer whose current batch holds units of the given sizes."""
    defaults = dict(noise_multiplier=0.0, max_grad_norm=1.0, expected_batch_size=1)
    return StudyDPOptimizer(torch.optim.SGD(model.parameters(), lr=0.1),
                            unit_sizes=lambda: sizes, **{**defaults, **kw})


def _clipped_sum(model, grads, sizes, **kw):
    """Σ over units of the clipped unit gradients, for per-sample gradients ``grads``."""
    for p, g in zip(model.parameters(), grads):
        p.grad_sample = g.clone()
        p.summed_grad = None
    opt = _optimizer(model, sizes, **kw)
    opt.clip_and_accumulate()
    return torch.cat([p.summed_grad.flatten() for p in model.parameters()]), opt


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.Linear(5, 3))


def _grads(model, rows, scale, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn((rows, *p.shape), generator=g) * scale for p in model.parameters()]


# ---- which B-scans form a subject ------------------------------------------------

def test_duke_scans_group_by_subject_and_phantom_scans_stand_alone():
    names = ["Subject_02_00", "Subject_01_00", "Subject_02_05", "phantom_3_000",
             "phantom_3_001", "Subject_01_10"]
    assert [unit_of(n) for n in names] == ["Subject_02", "Subject_01", "Subject_02",
                                           "phantom_3_000", "phantom_3_001", "Subject_01"]
    assert group_by_unit(names) == [[0, 2], [1, 5], [3], [4]]


@pytest.mark.parametrize("name", ["scan_001", "Subject_01", "subject_01_02", "x"])
def test_names_without_a_subject_are_refused_not_guessed(name):
    with pytest.raises(DataError, match=f"B-scan '{name}'.*Subject_<id>_<scan>"):
        group_by_unit(["Subject_01_00", name])


def test_real_duke_training_split_has_six_subjects_of_eleven_scans(duke_root):
    groups = group_by_unit([s.name for s in load_split(duke_root, "train")])
    assert [len(g) for g in groups] == [11] * 6


# ---- Poisson sampling of whole subjects -----------------------------------------

def test_sampler_includes_whole_subjects_independently_at_rate_q():
    sizes = [1, 3, 11, 2, 5, 4, 7, 1]
    groups = group_by_unit(_names(sizes))
    q, steps = 0.3, 3000
    torch.manual_seed(0)
    sampler = UnitPoissonSampler(groups, q, steps)
    counts, together = np.zeros(len(groups), int), 0
    for batch in sampler:
        drawn = [u for u, g in enumerate(groups) if g[0] in batch]
        # whole subjects, each one's scans adjacent, in the order ``sizes`` reports
        assert batch == [i for u in drawn for i in groups[u]]
        assert sampler.sizes == [sizes[u] for u in drawn]
        counts[drawn] += 1
        together += {0, 1} <= set(drawn)
    assert len(sampler) == steps
    for c in counts:   # each subject ~ Binomial(steps, q)
        assert binomtest(int(c), steps, q).pvalue > 1e-4
    assert binomtest(together, steps, q * q).pvalue > 1e-4   # independent draws


def test_unit_loader_uses_opacus_rate_over_subjects_and_yields_empty_batches():
    sizes = [3, 1, 4, 2, 2]
    data = NamedData(_names(sizes), torch.arange(12.0)[:, None], torch.zeros(12))
    loader = unit_loader(data, batch_size=2)
    assert len(loader) == 3            # ⌈5 subjects / 2⌉ steps, q = 1/3
    assert loader.batch_sampler.sample_rate == 1 / 3
    torch.manual_seed(1)
    seen_empty = False
    for _ in range(30):
        for x, y in loader:
            assert len(x) == sum(loader.batch_sampler.sizes) == len(y)
            seen_empty |= len(x) == 0
            assert x.shape[1:] == (1,)
    assert seen_empty     # P(empty) = (2/3)^5 ≈ 0.13 per step, 90 steps
    with pytest.raises(ConfigError, match="batch_size=6 is larger than the number of "
                                          "training subjects \\(5\\)"):
        unit_loader(data, batch_size=6)


# ---- one clipped gradient per subject ------------------------------------------

@pytest.mark.parametrize("per_layer", [False, True])
@pytest.mark.parametrize("clip_fn", ["abadi", "automatic"])
def test_a_subjects_clipped_contribution_is_within_c_whatever_its_scan_count(per_layer,
                                                                             clip_fn):
    model, bound = _model(), 0.7
    for n_scans in (1, 2, 11, 40):
        for scale in (1e-3, 1.0, 1e3):
            grads = _grads(model, n_scans, scale, seed=n_scans)
            total, _ = _clipped_sum(model, grads, [n_scans], max_grad_norm=bound,
                                    per_layer=per_layer, clip_fn=clip_fn)
            assert total.norm() <= bound * (1 + 1e-6)


def test_subject_gradient_is_the_sum_of_its_scans_clipped_once():
    """Hand-made gradients: subject A (two scans) sums to (3, 0, 4), norm 5, clipped to C=1;
    subject B (three scans) sums to (0, 0.3, 0), kept. Clipping scans one by one would
    keep both of A's (norms < 1) and give a different update."""
    model = nn.Linear(3, 1, bias=False)
    g = torch.tensor([[1.0, 0, 4.0 / 5], [2.0, 0, 16.0 / 5],
                      [0, 0.1, 0], [0, 0.1, 0], [0, 0.1, 0]])[:, None, :]
    total, opt = _clipped_sum(model, [g], [2, 3])
    assert torch.allclose(total, torch.tensor([0.6, 0.3, 0.8]), atol=1e-6)
    assert torch.allclose(opt.norm_log[0], torch.tensor([5.0, 0.3]), atol=1e-6)
    assert opt.clipped_log[0].tolist() == [True, False]


def test_augmented_copies_average_within_a_scan_and_sum_over_the_subject():
    """K = 2 copies per scan, a subject of two scans: (mean of copies) summed over scans."""
    model = nn.Linear(2, 1, bias=False)
    g = torch.tensor([[0.2, 0], [0.4, 0],     # scan 1: mean (0.3, 0)
                      [0, 0.1], [0, 0.3],     # scan 2: mean (0, 0.2)
                      [9.0, 0], [7.0, 0]])    # subject 2, one scan: mean (8, 0), clipped
    total, _ = _clipped_sum(model, [g[:, None, :]], [2, 1], aug_multiplicity=2)
    assert torch.allclose(total, torch.tensor([1.3, 0.2]), atol=1e-6)


@pytest.mark.parametrize("variant", ["abadi", "automatic", "per_layer", "sparsified"])
def test_removing_or_changing_one_subject_moves_the_update_by_at_most_its_bound(variant):
    """Add/remove adjacency (what the accountant assumes): dropping all scans of one
    subject changes the summed clipped update by ≤ C; replacing them by any number of
    other scans by ≤ 2C. Checked for extreme gradients, with and without RS masks."""
    model, bound = _model(), 0.5
    kw = {"max_grad_norm": bound, "clip_fn": "automatic" if variant == "automatic" else "abadi",
          "per_layer": variant == "per_layer"}
    if variant == "sparsified":
        sp = Sparsifier([p.shape for p in model.parameters()], 0.5, 1, 1, seed=0)
        sp.maybe_refresh(0, 0, 1)
        kw["sparsifier"] = sp
    rng = np.random.default_rng(0)
    for trial in range(20):
        sizes = [int(s) for s in rng.integers(1, 12, size=4)]
        scale = float(10.0 ** rng.uniform(-3, 3))
        grads = _grads(model, sum(sizes), scale, seed=trial)
        full, _ = _clipped_sum(model, grads, sizes, **kw)
        # subject 1 (rows sizes[0]:sizes[0]+sizes[1]) removed
        lo, hi = sizes[0], sizes[0] + sizes[1]
        without = [torch.cat([g[:lo], g[hi:]]) for g in grads]
        removed, _ = _clipped_sum(model, without, sizes[:1] + sizes[2:], **kw)
        assert (full - removed).norm() <= bound * (1 + 1e-5)
        other = _grads(model, 7, scale * 100, seed=100 + trial)
        swapped = [torch.cat([g[:lo], o, g[hi:]]) for g, o in zip(grads, other)]
        replaced, _ = _clipped_sum(model, swapped, sizes[:1] + [7] + sizes[2:], **kw)
        assert (full - replaced).norm() <= 2 * bound * (1 + 1e-5)


def test_units_out_of_step_with_the_batch_are_an_error_not_a_silent_regrouping():
    model = nn.Linear(3, 1, bias=False)
    with pytest.raises(RuntimeError, match="5 per-sample gradients but its units account "
                                           "for 4"):
        _clipped_sum(model, [torch.ones(5, 1, 3)], [2, 2])


def test_an_empty_subject_batch_takes_a_noise_only_step():
    model = nn.Linear(50, 40, bias=False)
    opt = _optimizer(model, [], noise_multiplier=2.0, max_grad_norm=0.5)
    model.weight.grad_sample = torch.zeros(0, 40, 50)
    opt.clip_and_accumulate()
    opt.add_noise()
    assert torch.equal(model.weight.summed_grad, torch.zeros(40, 50))
    assert abs(float(model.weight.grad.std()) / (2.0 * 0.5) - 1) < 0.05


# ---- through the method and the real training loop -------------------------------

def test_method_clips_per_subject_and_accounts_over_subjects():
    """Linear model, loss Σ w·x: the per-sample gradient is x itself, so the update of
    each step is known by hand: Σ over drawn subjects of clip(Σ of their x) / E[subjects]."""
    sizes = [2, 3, 1, 4, 2, 3]
    n = sum(sizes)
    x = torch.randn(n, 3, generator=torch.Generator().manual_seed(0)) * 2
    subject = torch.repeat_interleave(torch.arange(6), torch.tensor(sizes))
    data = NamedData(_names(sizes), x, torch.zeros(n))
    cfg = RunConfig(method="dp_sgd", noise_multiplier=1e-9, max_grad_norm=1.0,
                    privacy_unit="subject", batch_size=2, epochs=1)
    method = build_method(cfg)
    linear = nn.Linear(3, 1, bias=False)
    model, opt, loader = method.attach(linear, torch.optim.SGD(linear.parameters(), lr=0.0),
                                       DataLoader(data, batch_size=2))
    assert method.n_units == 6 and len(loader) == 3 and method.sample_rate == 1 / 3
    assert opt.expected_batch_size == 2
    torch.manual_seed(3)
    for xb, _ in loader:
        opt.zero_grad()
        if len(xb):
            (model(xb).sum() / len(xb)).backward()
        else:   # as the training loop does for an empty Poisson batch
            linear.weight.grad_sample = torch.zeros(0, 1, 3)
        opt.step()
        rows = [int((x == r).all(1).nonzero()) for r in xb]
        expected = torch.zeros(3)
        for s in subject[rows].unique():
            g = x[rows][subject[rows] == s].sum(0)
            expected += g * min(1.0, 1.0 / float(g.norm()))
        assert torch.allclose(linear.weight.grad[0], expected / 2, atol=1e-5)
    assert method.engine.accountant.history == [(1e-9, 1 / 3, 3)]


def test_subjects_are_drawn_from_the_loaders_generator_alone():
    """Subject sampling is reproducible from the loader's generator (seeded from the run's
    seed by training), whatever the global RNG; another generator seed draws otherwise."""
    sizes = [2, 3, 1, 4, 2, 3]
    data = NamedData(_names(sizes), torch.arange(15.0)[:, None].expand(15, 3), torch.zeros(15))
    cfg = RunConfig(method="dp_sgd", noise_multiplier=1.0, privacy_unit="subject",
                    batch_size=2, epochs=1)
    draws = []
    for global_seed, seed in [(0, 5), (1, 5), (0, 6)]:
        linear = nn.Linear(3, 1, bias=False)
        _, _, loader = build_method(cfg).attach(
            linear, torch.optim.SGD(linear.parameters(), lr=0.0),
            DataLoader(data, batch_size=2, generator=torch.Generator().manual_seed(seed)))
        torch.manual_seed(global_seed)
        draws.append([sorted(int(x) for x in xb[:, 0]) for _ in range(4) for xb, _ in loader])
    assert draws[0] == draws[1] != draws[2]


@pytest.mark.parametrize("case", [
    dict(method="dp_sgd"),
    dict(method="auto_clip"),
    dict(method="random_sparsification", final_rate=0.5),
    dict(method="dp_sgd", augment=True, aug_multiplicity=2, clipping="per_layer"),
])
def test_subject_level_training_runs_and_records_its_unit(tmp_path, case):
    data = make_duke(tmp_path / "duke", n_train=4, n_val=1, scans=3, shape=(32, 32))
    cfg = RunConfig(data=str(data), image_size=(32, 32), base_width=4, depth=2, epochs=2,
                    batch_size=2, noise_multiplier=1.0, privacy_unit="subject", **case)
    meta = json.loads((train(cfg, tmp_path / "runs", progress=False, log=lambda *_: None)
                       / "config.json").read_text())
    assert meta["status"] == "completed", meta.get("error")
    assert meta["privacy_unit"] == "subject" and meta["n_units"] == 4
    assert meta["data"]["n_train"] == 12
    assert meta["sample_rate"] == 0.5 and meta["steps"] == 4   # q over subjects, ⌈4/2⌉/epoch
    ref = RDPAccountant()
    for _ in range(4):
        ref.step(noise_multiplier=1.0, sample_rate=0.5)
    assert meta["epsilon"] == pytest.approx(ref.get_epsilon(cfg.delta), rel=1e-9)


def test_privacy_unit_is_validated_and_hash_neutral_at_its_default():
    base = RunConfig(method="dp_sgd", noise_multiplier=1.0)
    assert HASH_NEUTRAL_DEFAULTS["privacy_unit"] == "bscan" == base.privacy_unit
    assert base.config_hash() == base.replace(privacy_unit="bscan").config_hash()
    assert base.config_hash() != base.replace(privacy_unit="subject").config_hash()
    with pytest.raises(ConfigError, match="privacy_unit='patient' is not valid"):
        base.replace(privacy_unit="patient")
    with pytest.raises(ConfigError, match="privacy_unit=subject needs a DP method"):
        RunConfig(privacy_unit="subject")
    with pytest.raises(ConfigError, match="max_physical_batch=2 cannot be used with "
                                          "privacy_unit=subject"):
        base.replace(privacy_unit="subject", max_physical_batch=2)


@pytest.mark.parametrize("delta,shown", [(0.4, "0.4"), (1 / 3, "0.333333")])  # δ = 1/N too
def test_delta_must_be_below_one_over_the_number_of_subjects(delta, shown):
    data = NamedData(_names([2, 2, 2]), torch.randn(6, 3), torch.zeros(6))
    cfg = RunConfig(method="dp_sgd", noise_multiplier=1.0, privacy_unit="subject",
                    batch_size=1, delta=delta)
    model = nn.Linear(3, 1)
    with pytest.raises(ConfigError, match=f"delta={shown} must be < 1/N = 0.333 \\(N = 3 "
                                          "training subjects\\)"):
        build_method(cfg).attach(model, torch.optim.SGD(model.parameters(), lr=0.1),
                                 DataLoader(data))
