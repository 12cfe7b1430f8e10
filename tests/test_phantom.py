"""The synthetic OCT phantom: determinism, anatomy of the labels, Duke-like intensities."""

import numpy as np
import pytest

from dpstudy.classes import N_CLASSES
from dpstudy.data.phantom import make_phantom, phantom_splits
from dpstudy.errors import DataError

FLUID, LAYERS = 8, range(1, 8)


@pytest.fixture(scope="module")
def scans():
    return make_phantom(8, seed=0)


def test_same_seed_same_bytes_different_seed_different():
    a, b, c = make_phantom(2, 5), make_phantom(2, 5), make_phantom(2, 6)
    for x, y in zip(a, b):
        assert x.image.tobytes() == y.image.tobytes() and x.mask.tobytes() == y.mask.tobytes()
    assert all(x.image.tobytes() != z.image.tobytes() for x, z in zip(a, c))
    assert all(x.mask.tobytes() != z.mask.tobytes() for x, z in zip(a, c))


def test_scan_depends_only_on_seed_and_index():
    short, long_ = make_phantom(1, 3), make_phantom(2, 3)
    assert np.array_equal(short[0].image, long_[0].image)
    assert [s.name for s in long_] == ["phantom_3_000", "phantom_3_001"]


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


def test_layers_ordered_top_down_in_every_column(scans):
    """Ignoring fluid, each column reads background, layers 1..7 in order, background."""
    for s in scans:
        for col in s.mask.T:
            seq = col[col != FLUID]
            layer = (seq >= 1) & (seq <= 7)
            first, last = np.argmax(layer), len(seq) - 1 - np.argmax(layer[::-1])
            assert (seq[:first] == 0).all() and (seq[last + 1:] == 0).all()
            assert (np.diff(seq[first:last + 1].astype(int)) >= 0).all()
            # every layer but GCL–IPL and INL (which vanish at the foveola) is in every column
            assert {1, 4, 5, 6, 7} <= set(seq[first:last + 1].tolist())


def test_fluid_sits_inside_inl_opl_onl(scans):
    with_fluid = [s for s in scans if (s.mask == FLUID).any()]
    assert 0 < len(with_fluid) < len(scans)  # edema in a random subset of scans
    for s in with_fluid:
        f = s.mask == FLUID
        above = s.mask[:-1][f[1:] & ~f[:-1]]
        below = s.mask[1:][f[:-1] & ~f[1:]]
        assert set(np.concatenate([above, below]).tolist()) <= {3, 4, 5}


def test_thickness_profile_around_the_fovea(scans):
    """GCL–IPL vanishes at the foveola while ONL–ISM is thickest there."""
    for s in scans:
        gcl = (s.mask == 2).sum(0)
        onl = (s.mask == 5).sum(0) + (s.mask == FLUID).sum(0)
        assert gcl.min() == 0 and gcl.max() >= 15
        assert onl[np.argmin(gcl)] > np.median(onl)


def test_intensities_match_duke(scans):
    """Per-class mean intensity close to the Duke training data, in Duke's order.

    Duke means (excluding the white padding): NFL 129, GCL–IPL 96, INL 75, OPL 78,
    ONL–ISM 54, ISE 115, OS–RPE 141, fluid 47.
    """
    duke = {1: 129, 2: 96, 3: 75, 4: 78, 5: 54, 6: 115, 7: 141, 8: 47}
    img = np.concatenate([s.image.ravel() for s in scans]).astype(float)
    mask = np.concatenate([s.mask.ravel() for s in scans])
    mean = {c: img[(mask == c) & (img < 255)].mean() for c in duke}
    for c, target in duke.items():
        assert abs(mean[c] - target) < 15, (c, mean[c], target)
    assert mean[7] == max(mean.values()) and mean[5] == min(mean[c] for c in LAYERS)
    background = img[(mask == 0) & (img < 255)].mean()
    assert background < mean[5]
    assert 0 < (img == 255).mean() < 0.15  # white registration padding, as in Duke


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
