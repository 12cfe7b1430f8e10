"""Resizing, normalisation, augmentation and the training dataset."""

import numpy as np
import pytest
import torch

from dpstudy.data.dataset import SegmentationDataset
from dpstudy.data.sample import Sample
from dpstudy.data.transforms import (
    MAX_SHIFT,
    augment,
    logits_to_native,
    normalisation_stats,
    resize_image,
    resize_mask,
)
from dpstudy.errors import DataError


def layered_mask(h=50, w=37):
    """Horizontal bands 0, 1, 3, 5, 7 of uneven height: neighbours differ by 2."""
    rows = np.repeat([0, 1, 3, 5, 7], [11, 9, 13, 7, 10])[:h]
    return np.tile(rows[:, None], (1, w)).astype(np.uint8)


@pytest.mark.parametrize("size", [(24, 16), (17, 41), (128, 96), (50, 37)])
def test_nearest_resize_never_invents_labels_but_bilinear_would(size):
    mask = layered_mask()
    out = resize_mask(mask, size)
    assert out.shape == size and out.dtype == np.uint8
    assert set(np.unique(out).tolist()) <= {0, 1, 3, 5, 7}
    if size != mask.shape:
        # interpolating labels creates values between neighbours (e.g. 2, 4, 6): wrong classes
        smeared = np.rint(resize_image(mask, size)).astype(int)
        assert set(np.unique(smeared).tolist()) - {0, 1, 3, 5, 7}


def test_resize_mask_samples_pixel_centres():
    mask = np.arange(16, dtype=np.uint8).reshape(4, 4)
    assert resize_mask(mask, (2, 2)).tolist() == [[5, 7], [13, 15]]
    assert np.array_equal(resize_mask(mask, (8, 8)), mask.repeat(2, 0).repeat(2, 1))


def test_resize_image_types_and_antialiasing():
    img = np.full((30, 20), 77, np.uint8)
    out = resize_image(img, (15, 40))
    assert out.dtype == np.float32 and out.shape == (15, 40)
    assert np.allclose(out, 77)
    # a 1-pixel checkerboard shrunk 4x must average out, not alias into a pattern
    checker = (np.indices((64, 64)).sum(0) % 2 * 255).astype(np.uint8)
    assert resize_image(checker, (16, 16)).std() < 1


def test_logits_to_native_keeps_the_argmax():
    logits = torch.zeros(3, 8, 8)
    logits[2, :, :4] = 5.0  # class 2 on the left half
    logits[0, :, 4:] = 5.0  # class 0 on the right half
    native = logits_to_native(logits, (20, 30))
    assert native.shape == (3, 20, 30)
    pred = native.argmax(0)
    assert (pred[:, :15] == 2).all() and (pred[:, 16:] == 0).all()
    assert logits_to_native(logits[None].repeat(2, 1, 1, 1), (20, 30)).shape == (2, 3, 20, 30)
    with pytest.raises(DataError, match=r"shape \(8, 8\)"):
        logits_to_native(logits[0], (20, 30))


def test_normalisation_stats_over_all_pixels():
    a = Sample("a", np.array([[0, 10], [20, 30]], np.uint8), np.zeros((2, 2), np.uint8))
    b = Sample("b", np.array([[40, 50, 60]], np.uint8), np.zeros((1, 3), np.uint8))
    pixels = np.array([0, 10, 20, 30, 40, 50, 60], float)
    mean, std = normalisation_stats([a, b])
    assert mean == pytest.approx(pixels.mean()) and std == pytest.approx(pixels.std())
    with pytest.raises(DataError, match="training split is empty"):
        normalisation_stats([])
    flat = Sample("c", np.full((3, 3), 9, np.uint8), np.zeros((3, 3), np.uint8))
    with pytest.raises(DataError, match="intensity 9"):
        normalisation_stats([flat])


def test_augment_moves_image_and_labels_together():
    h, w = 60, 20
    y = torch.from_numpy(layered_mask(h, w).astype(np.int64))
    y[:, :5] = 2  # asymmetric, so a flip is visible
    x = y[None].float()
    x_in, y_in = x.clone(), y.clone()
    flips, shifts = 0, set()
    for seed in range(20):
        xo, yo = augment(x, y, torch.Generator().manual_seed(seed))
        assert xo.shape == x.shape and yo.shape == y.shape and yo.dtype == y.dtype
        # geometry is shared: the image is the same affine function of the labels everywhere
        gain = (xo.max() - xo.min()) / (yo.max() - yo.min())
        assert torch.allclose(xo, (yo - yo.min()) * gain + xo.min(), atol=1e-5)
        assert 0.9 <= gain <= 1.1
        flips += bool((yo[:, -5:] == 2).any())
        first_band = int(np.argmax((yo[:, 10] == 1).numpy()))
        shifts.add(first_band - 11)
        assert set(yo.unique().tolist()) <= set(y.unique().tolist())
    assert 0 < flips < 20
    assert len(shifts) > 3 and max(abs(s) for s in shifts) <= MAX_SHIFT * h
    assert torch.equal(x, x_in) and torch.equal(y, y_in)  # inputs untouched
    a = augment(x, y, torch.Generator().manual_seed(7))
    b = augment(x, y, torch.Generator().manual_seed(7))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def samples(n=3):
    rng = np.random.default_rng(0)
    return [Sample(f"s{i}", rng.integers(0, 256, (40, 30 + i), dtype=np.uint8),
                   rng.integers(0, 9, (40, 30 + i), dtype=np.uint8)) for i in range(n)]


def test_dataset_resizes_once_and_normalises():
    data = samples()
    ds = SegmentationDataset(data, (16, 24), (100.0, 50.0))
    assert len(ds) == 3 and ds.names == ["s0", "s1", "s2"]
    x, y = ds[1]
    assert x.shape == (1, 16, 24) and x.dtype == torch.float32
    assert y.shape == (16, 24) and y.dtype == torch.int64
    assert np.allclose(x[0].numpy(), (resize_image(data[1].image, (16, 24)) - 100) / 50, atol=1e-6)
    assert np.array_equal(y.numpy(), resize_mask(data[1].mask, (16, 24)))
    assert ds.native_masks[2] is data[2].mask and ds.native_images[2] is data[2].image
    assert torch.equal(ds[1][0], x)  # no augmentation: items are fixed


def test_dataset_edge_cases():
    empty = SegmentationDataset([], (16, 24), (100.0, 50.0))  # e.g. a data set without val
    assert len(empty) == 0 and empty.x.shape == (0, 1, 16, 24)
    with pytest.raises(DataError, match="std=0"):
        SegmentationDataset(samples(), (16, 24), (100.0, 0.0))
