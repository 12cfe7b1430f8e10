"""The synthetic OCT phantom: determinism, anatomy of the labels, intensities like the
validation subjects', and a randomised variant that varies more and stays anatomical."""

import os
from pathlib import Path

import numpy as np
import pytest

from dpstudy.classes import N_CLASSES
from dpstudy.data.phantom import make_phantom, phantom_pairs, phantom_splits
from dpstudy.data.phantom_stats import (
    fluid,
    fovea,
    geometry,
    label_means,
    load_raw_split,
    per_scan_layer_means,
    speckle,
)
from dpstudy.errors import DataError

FLUID, LAYERS = 8, range(1, 8)
#: per-raw-label mean intensity of Duke validation subjects 7–8 (white padding excluded),
#: as ``python -m dpstudy.data.phantom_stats DUKE --split val`` prints them
VAL_MEANS = {0: 25.2, 1: 130.9, 2: 94.2, 3: 72.6, 4: 78.6, 5: 56.5, 6: 131.9, 7: 158.3, 8: 24.0, 9: 50.8}
#: relative tolerance for 16 scans: per-scan gain and level spread (about 10 %) leave
#: the mean of 16 scans within about 2.6 % (1 sd) of the phantom's own expectation
TOLERANCE = 0.08


@pytest.fixture(scope="module")
def scans():
    return make_phantom(8, seed=0)


@pytest.fixture(scope="module")
def pairs16():
    return phantom_pairs(16, seed=0)


@pytest.fixture(scope="module")
def randomised():
    """Raw pairs of the standard and the fully randomised phantom, same seeds."""
    return phantom_pairs(24, seed=7), phantom_pairs(24, seed=7, dr=1.0)


def test_same_seed_same_bytes_different_seed_different():
    a, b, c = make_phantom(2, 5), make_phantom(2, 5), make_phantom(2, 6)
    for x, y in zip(a, b):
        assert x.image.tobytes() == y.image.tobytes() and x.mask.tobytes() == y.mask.tobytes()
    assert all(x.image.tobytes() != z.image.tobytes() for x, z in zip(a, c))
    assert all(x.mask.tobytes() != z.mask.tobytes() for x, z in zip(a, c))


def test_scan_depends_only_on_seed_index_and_strength():
    short, long_ = make_phantom(1, 3, dr=0.5), make_phantom(2, 3, dr=0.5)
    assert np.array_equal(short[0].image, long_[0].image)
    assert [s.name for s in long_] == ["phantom_3_000", "phantom_3_001"]
    assert np.array_equal(make_phantom(1, 3, dr=0.5)[0].image, short[0].image)
    assert not np.array_equal(make_phantom(1, 3, dr=1.0)[0].image, short[0].image)
    # strength 0 is the standard phantom, bit for bit
    assert make_phantom(1, 3)[0].image.tobytes() == make_phantom(1, 3, dr=0.0)[0].image.tobytes()


def test_duke_like_shape_and_types(scans):
    for s in scans:
        assert s.image.shape == s.mask.shape == (496, 512)
        assert s.image.dtype == np.uint8 and s.mask.dtype == np.uint8
        assert s.mask.max() < N_CLASSES
        assert (s.mask[:20] == 0).all()  # vitreous at the top
    (small,) = make_phantom(1, 0, height=128, width=160)
    assert small.image.shape == small.mask.shape == (128, 160)


def test_every_class_occurs(scans):
    present = set()
    for s in scans:
        present |= set(np.unique(s.mask).tolist())
    assert present == set(range(N_CLASSES))


def assert_anatomical(raw: np.ndarray) -> None:
    """Raw labels 0..9; ignoring fluid, each column reads vitreous, layers 1..7 in order,
    choroid; fluid only inside INL, OPL or ONL–ISM (raw 3, 4, 5)."""
    assert raw.dtype == np.uint8 and raw.max() <= 9
    assert (raw[:20] == 0).all() and (raw[-20:] == 8).all()
    for col in raw.T:
        seq = col[col != 9].astype(int)
        assert (np.diff(seq) >= 0).all()
        # every layer but GCL–IPL and INL (which vanish at the foveola) is in every column
        assert {0, 1, 4, 5, 6, 7, 8} <= set(seq.tolist())
    f = raw == 9
    above = raw[:-1][f[1:] & ~f[:-1]]
    below = raw[1:][f[:-1] & ~f[1:]]
    assert set(np.concatenate([above, below]).tolist()) <= {3, 4, 5}


def test_standard_phantom_is_anatomical(pairs16):
    for _, raw in pairs16:
        assert_anatomical(raw)
    with_fluid = sum((raw == 9).any() for _, raw in pairs16)
    assert 0 < with_fluid < len(pairs16)  # edema in a random subset of scans


def test_randomised_phantom_is_anatomical(randomised):
    for _, raw in randomised[1]:
        assert_anatomical(raw)


def test_thickness_profile_around_the_fovea(pairs16):
    """Every standard scan is foveal: GCL–IPL vanishes at the foveola, ONL–ISM is thickest there."""
    for _, raw in pairs16:
        gcl = (raw == 2).sum(0)
        onl = (raw == 5).sum(0) + (raw == 9).sum(0)
        assert gcl.min() == 0 and gcl.max() >= 15
        xf = fovea(raw)
        assert xf is not None and gcl[xf] <= 1
        far = np.abs(np.arange(raw.shape[1]) - xf) > 150
        assert onl[xf] > np.median(onl[far])


def test_intensities_match_the_validation_subjects(pairs16):
    """Per-label mean intensity within TOLERANCE of subjects 7–8's (the phantom is fitted to
    them, never to the training subjects), in their order."""
    mean = label_means(pairs16)
    for k, target in VAL_MEANS.items():
        assert abs(mean[k] - target) < TOLERANCE * target, (k, mean[k], target)
    assert mean[7] == max(mean[k] for k in LAYERS) and mean[5] == min(mean[k] for k in LAYERS)
    assert mean[0] < mean[9] < mean[5]  # vitreous darkest, fluid darker than any layer
    padding = np.mean([(img == 255).mean() for img, _ in pairs16])
    assert 0 < padding < 0.1  # white registration padding, as in Duke (3.6 % of pixels)


@pytest.mark.duke
def test_val_targets_are_what_the_validation_split_measures():
    """VAL_MEANS are the validation split's own numbers (measured live where it is available)."""
    root = Path(os.environ.get("DPSTUDY_DUKE_DIR", "/nonexistent"))
    if not (root / "val" / "images").is_dir():
        pytest.skip("Duke validation split not available (set DPSTUDY_DUKE_DIR)")
    measured = label_means(load_raw_split(root, "val"))
    for k, target in VAL_MEANS.items():
        assert measured[k] == pytest.approx(target, abs=0.06)


def test_speckle_is_like_the_validation_subjects(pairs16):
    """Residual contrast and one-pixel correlation in ONL–ISM near subjects 7–8's
    (0.149, axial 0.763, lateral 0.658)."""
    s = speckle(pairs16)
    assert s["contrast"] == pytest.approx(0.149, rel=0.15)
    assert s["axial_corr"] == pytest.approx(0.763, abs=0.06)
    assert s["lateral_corr"] == pytest.approx(0.658, abs=0.08)


def test_randomised_variant_varies_more(randomised):
    """Per-scan layer intensities, retinal thickness and position spread wider at dr = 1,
    some scans are away from the fovea (no pit), and edema can be larger."""
    std, wide = randomised
    sd = [np.nanstd(per_scan_layer_means(p), 0) for p in (std, wide)]
    assert (sd[1] > 1.5 * sd[0]).sum() >= 5, sd
    geo = [[geometry(raw) for _, raw in p] for p in (std, wide)]
    for key in ("thickness", "bm", "tilt"):
        assert np.std([g[key] for g in geo[1]]) > 1.5 * np.std([g[key] for g in geo[0]]), key
    assert all(fovea(raw) is not None for _, raw in std)
    assert sum(fovea(raw) is None for _, raw in wide) >= 3
    assert fluid(wide)["largest_cyst_px"] > fluid(std)["largest_cyst_px"]


def test_stats_from_first_principles():
    """The measurements on arrays whose answers are known."""
    raw = np.zeros((60, 40), np.uint8)
    for k, (top, bot) in enumerate([(10, 13), (13, 20), (20, 24), (24, 27), (27, 40), (40, 43), (43, 46)]):
        raw[top:bot] = k + 1
    raw[46:] = 8
    raw[30:33, 10:14] = 9  # one 12-pixel cyst inside ONL–ISM
    img = (raw * 10).astype(np.uint8)
    img[0, 0] = 255  # padding is excluded
    assert label_means([(img, raw)]) == {k: 10.0 * k for k in range(10)}
    g = geometry(raw)
    assert g["top"] == 10 and g["bm"] == 46 and g["thickness"] == 36
    assert g["tilt"] == pytest.approx(0) and g["curvature"] == pytest.approx(0)
    assert fovea(raw) is None  # GCL–IPL everywhere: no pit
    raw_pit = raw.copy()
    raw_pit[13:20, 15:25] = 3  # GCL–IPL gone over 10 central columns
    assert abs(fovea(raw_pit) - 20) <= 2
    fl = fluid([(img, raw), (img, np.where(raw == 9, 5, raw).astype(np.uint8))])
    assert fl["prevalence"] == 0.5 and fl["cysts_per_scan"] == 1 and fl["largest_cyst_px"] == 12
    assert fl["hosts"] == {5: 1.0}
    # white noise has no grain: neighbouring residuals uncorrelated
    tall = np.zeros((200, 200), np.uint8)
    tall[20:180] = 5
    noise = np.random.default_rng(0).integers(40, 80, tall.shape).astype(np.uint8)
    s = speckle([(noise, tall)])
    assert abs(s["axial_corr"]) < 0.1 and abs(s["lateral_corr"]) < 0.1


def test_splits_sizes_and_disjoint_seeds():
    splits = phantom_splits(seed=1, n_train=2, n_val=1, n_test=1, height=96, width=96)
    assert {k: len(v) for k, v in splits.items()} == {"train": 2, "val": 1, "test": 1}
    assert [s.name for s in splits["val"]] == ["phantom_4_000"]
    assert splits["train"][0].image.tobytes() != splits["val"][0].image.tobytes()
    names = [s.name for v in phantom_splits(seed=0, n_train=2, n_val=1, n_test=1,
                                            height=96, width=96).values() for s in v]
    assert not set(names) & {s.name for v in splits.values() for s in v}


def test_bad_arguments():
    with pytest.raises(DataError, match="n=-1"):
        make_phantom(-1, 0)
    with pytest.raises(DataError, match="32x512 is too small.*>= 64"):
        make_phantom(1, 0, height=32)
    for dr in (-0.1, 1.5, float("nan")):
        with pytest.raises(DataError, match=r"dr=.*0 <= dr <= 1"):
            make_phantom(1, 0, dr=dr)
