"""Reading prepared Duke data: label mapping, validation of every bad input, real data."""

import numpy as np
import pytest

from dpstudy.classes import N_CLASSES
from dpstudy.data.duke import available_splits, load_split, map_raw_labels
from dpstudy.errors import DataError


def write_pair(root, split, name, image, mask):
    for sub, arr in (("images", image), ("masks", mask)):
        (root / split / sub).mkdir(parents=True, exist_ok=True)
        np.save(root / split / sub / f"{name}.npy", arr)


def good_pair(seed=0, shape=(6, 5)):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, shape, dtype=np.uint8), rng.integers(0, 10, shape, dtype=np.uint8)


# --- label mapping -----------------------------------------------------------------

def test_map_raw_labels_table():
    # vitreous (0) and choroid (8) merge into background; fluid (9) becomes class 8
    expected = [0, 1, 2, 3, 4, 5, 6, 7, 0, 8]
    for dtype in (np.uint8, np.int16, np.int64, np.float32, np.float64):
        out = map_raw_labels(np.arange(10, dtype=dtype).reshape(2, 5), "m.npy")
        assert out.dtype == np.uint8
        assert out.ravel().tolist() == expected


@pytest.mark.parametrize("bad, reason", [
    (np.array([[0.0, np.nan]]), "NaN"),
    (np.array([[0.0, np.inf]]), "NaN or infinity"),
    (np.array([[1.0, 2.5]]), "2.5 is not a whole number"),
    (np.array([[0, 10]]), r"\[10\] are out of range"),
    (np.array([[-1, 3]]), r"\[-1\] are out of range"),
    (np.array([["a", "b"]]), "dtype"),
])
def test_map_raw_labels_rejects_bad_values(bad, reason):
    with pytest.raises(DataError, match=f"where/mask.npy.*{reason}.*0..9"):
        map_raw_labels(bad, "where/mask.npy")


# --- split discovery ---------------------------------------------------------------

def test_available_splits_in_canonical_order(tmp_path):
    for split in ("test", "train"):
        (tmp_path / split / "images").mkdir(parents=True)
    (tmp_path / "val").mkdir()  # no images folder: not a split
    assert available_splits(tmp_path) == ["train", "test"]


def test_available_splits_errors(tmp_path):
    with pytest.raises(DataError, match="nowhere.*does not exist"):
        available_splits(tmp_path / "nowhere")
    with pytest.raises(DataError, match="holds none of the splits train, val, test"):
        available_splits(tmp_path)


# --- loading ----------------------------------------------------------------------

def test_load_split_sorted_limited_and_mapped(tmp_path):
    for i, name in enumerate(["b", "a", "c"]):
        write_pair(tmp_path, "val", name, *good_pair(i))
    (tmp_path / "val" / "images" / ".DS_Store").write_bytes(b"junk")  # OS clutter is ignored
    samples = load_split(tmp_path, "val")
    assert [s.name for s in samples] == ["a", "b", "c"]
    image, mask = good_pair(1)
    assert np.array_equal(samples[0].image, image)
    assert np.array_equal(samples[0].mask, map_raw_labels(mask, "x"))
    assert [s.name for s in load_split(tmp_path, "val", limit=2)] == ["a", "b"]


def test_float_images_become_float32(tmp_path):
    image, mask = good_pair()
    write_pair(tmp_path, "train", "f", image.astype(np.float64) / 255, mask)
    (sample,) = load_split(tmp_path, "train")
    assert sample.image.dtype == np.float32


def _bad_case(tmp_path, case):
    """Build one broken split; return the path the error message must name."""
    image, mask = good_pair()
    images, masks = tmp_path / "train" / "images", tmp_path / "train" / "masks"
    if case == "missing split":
        (tmp_path / "val" / "images").mkdir(parents=True)
        return images
    if case == "empty split":
        images.mkdir(parents=True)
        return images
    write_pair(tmp_path, "train", "a", image, mask)
    if case == "no masks folder":
        (masks / "a.npy").unlink()
        masks.rmdir()
        return masks
    if case == "missing mask":
        np.save(images / "b.npy", image)
        return masks / "b.npy"
    if case == "not npy":
        (images / "notes.txt").write_text("hello")
        return images / "notes.txt"
    if case == "truncated":
        data = (images / "a.npy").read_bytes()
        (images / "a.npy").write_bytes(data[: len(data) // 2])
        return images / "a.npy"
    if case == "pickled objects":
        np.save(masks / "a.npy", np.array([[{"x": 1}]], dtype=object), allow_pickle=True)
        return masks / "a.npy"
    if case == "npz archive":
        with open(images / "a.npy", "wb") as f:
            np.savez(f, image=image)
        return images / "a.npy"
    if case == "3-D":
        np.save(images / "a.npy", image[None])
        return images / "a.npy"
    if case == "zero size":
        np.save(masks / "a.npy", np.zeros((0, 5), np.uint8))
        return masks / "a.npy"
    if case == "shape mismatch":
        np.save(masks / "a.npy", mask[:, :-1])
        return images / "a.npy"
    if case == "bad labels":
        bad = mask.copy()
        bad[0, 0] = 12
        np.save(masks / "a.npy", bad)
        return masks / "a.npy"
    if case == "nan image":
        bad = image.astype(np.float32)
        bad[0, 0] = np.nan
        np.save(images / "a.npy", bad)
        return images / "a.npy"
    raise AssertionError(case)


BAD_CASES = {
    "missing split": "does not exist", "empty split": "is empty", "no masks folder": "does not exist",
    "missing mask": "does not exist", "not npy": "not a .npy file", "truncated": "not a readable .npy",
    "pickled objects": "not a readable .npy", "npz archive": ".npz archive", "3-D": "expected a 2-D",
    "zero size": "is empty", "shape mismatch": "must match", "bad labels": "out of range",
    "nan image": "finite",
}


@pytest.mark.parametrize("case", list(BAD_CASES))
def test_load_split_rejects_bad_input(tmp_path, case):
    culprit = _bad_case(tmp_path, case)
    with pytest.raises(DataError) as err:
        load_split(tmp_path, "train")
    assert str(culprit) in str(err.value)
    assert BAD_CASES[case] in str(err.value)


def test_load_split_rejects_bad_arguments(tmp_path):
    write_pair(tmp_path, "train", "a", *good_pair())
    with pytest.raises(DataError, match="unknown split 'training'.*train, val, test"):
        load_split(tmp_path, "training")
    with pytest.raises(DataError, match="limit=0 is invalid"):
        load_split(tmp_path, "train", limit=0)


# --- real data --------------------------------------------------------------------

def test_real_duke_data(duke_root):
    assert available_splits(duke_root) == ["train", "val"]
    for split, n, first in (("train", 66, "Subject_01_00"), ("val", 22, "Subject_07_00")):
        samples = load_split(duke_root, split)
        assert len(samples) == n and samples[0].name == first
        present = set()
        for s in samples:
            assert s.image.dtype == np.uint8 and s.mask.dtype == np.uint8
            assert s.image.shape == s.mask.shape
            assert s.image.shape[0] == 496 and 500 <= s.image.shape[1] <= 548
            present |= set(np.unique(s.mask).tolist())
        assert present == set(range(N_CLASSES))  # classes 0..8 only, and every one occurs
