"""Converting original Duke ``Subject_XX.mat`` files (MATLAB v5 and v7.3) into ``.npy`` splits.

The synthetic subjects below are small (20 rows × 12 columns × 3 B-scans) and their
expected masks are written out by hand from the documented row convention.
"""

import h5py
import numpy as np
import pytest
import scipy.io

from dpstudy.data.duke import load_split
from dpstudy.data.prepare import prepare_duke
from dpstudy.errors import DataError

H, W, N = 20, 12, 3
NAN = np.nan

# B-scan 0: not annotated. B-scan 1: columns 2..9 annotated. B-scan 2: all columns, with
# boundary 3 missing at column 5 (interpolated from columns 4 and 6).
REGULAR = [3, 5, 7, 9, 11, 13, 15, 17]  # MATLAB 1-based rows
# boundaries at the top row, rounding (8.4 -> 8, 10.6 -> 11) and an empty layer 2
ODD = [1, 2, 2, 6, 8.4, 10.6, 19, 20]


def subject(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (H, W, N), dtype=np.uint8)
    layers = np.full((8, W, N), NAN)
    for c in range(2, 10):
        layers[:, c, 1] = REGULAR
    layers[:, 3, 1] = ODD
    layers[:, :, 2] = np.array(REGULAR)[:, None]
    layers[3, 4, 2], layers[3, 5, 2], layers[3, 6, 2] = 9, NAN, 11
    fluid = np.zeros((H, W, N))
    fluid[12, 4, 1] = 1  # a fluid pixel inside the annotated range
    fluid[5, 0, 1] = 1  # outside the range: cropped away
    return {"images": images, "manualLayers1": layers, "manualFluid1": fluid}


def write_v5(path, fields):
    scipy.io.savemat(path, fields)


def write_v73(path, fields):
    """MATLAB v7.3: an HDF5 file behind a 512-byte text header, arrays stored column-major
    (so h5py sees the axes reversed)."""
    with h5py.File(path, "w", userblock_size=512) as f:
        for name, arr in fields.items():
            f.create_dataset(name, data=np.ascontiguousarray(arr.T))
    text = b"MATLAB 7.3 MAT-file, Platform: GLNXA64, Created on: Mon Jan  1 00:00:00 2024 HDF5 schema 1.00 ."
    with open(path, "r+b") as f:  # text, subsystem offset, version 0x0200, endian mark
        f.write(text.ljust(116) + bytes(8) + b"\x00\x02" + b"IM")


WRITERS = {"v5": write_v5, "v7.3": write_v73}

# expected raw labels of a REGULAR column: boundary k at 1-based row r starts layer k+1
# at 0-based row r - 1
REGULAR_COLUMN = [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7, 8, 8, 8, 8]
ODD_COLUMN = [1, 3, 3, 3, 3, 4, 4, 5, 5, 5, 6, 6, 6, 6, 6, 6, 6, 6, 7, 8]


@pytest.mark.parametrize("fmt", list(WRITERS))
def test_masks_from_boundaries(tmp_path, fmt):
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    subjects = {1: subject(1), 2: subject(2)}
    for sid, fields in subjects.items():
        WRITERS[fmt](src / f"Subject_{sid:02d}.mat", fields)
    if fmt == "v7.3":  # really the HDF5 flavour scipy cannot read
        with pytest.raises(NotImplementedError):
            scipy.io.loadmat(src / "Subject_01.mat")

    counts = prepare_duke(src, dst, {"train": [1], "val": [2]})
    assert counts == {"train": 2, "val": 2}
    names = sorted(p.name for p in (dst / "train" / "images").iterdir())
    assert names == ["Subject_01_00.npy", "Subject_01_01.npy"]  # indices among kept scans

    load = lambda kind, name: np.load(dst / "train" / kind / name)  # noqa: E731
    image, mask = load("images", "Subject_01_00.npy"), load("masks", "Subject_01_00.npy")
    assert image.dtype == mask.dtype == np.uint8
    assert image.shape == mask.shape == (H, 8)  # cropped to columns 2..9
    assert np.array_equal(image, subjects[1]["images"][:, 2:10, 1])
    assert mask[:, 0].tolist() == REGULAR_COLUMN
    assert mask[:, 1].tolist() == ODD_COLUMN  # column 3
    fluid_column = REGULAR_COLUMN.copy()
    fluid_column[12] = 9
    assert mask[:, 2].tolist() == fluid_column  # column 4
    assert (mask == 9).sum() == 1

    mask = load("masks", "Subject_01_01.npy")
    assert mask.shape == (H, W)
    gap_column = REGULAR_COLUMN.copy()
    gap_column[8] = 3  # boundary 3 interpolated to row 10 (1-based)
    assert mask[:, 5].tolist() == gap_column
    # column 6: boundary 3 moved onto boundary 4, so OPL (label 4) is empty there
    assert mask[:, 6].tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 3, 3, 5, 5, 6, 6, 7, 7, 8, 8, 8, 8]

    # the prepared folder is what the loader reads; raw fluid 9 becomes class 8
    samples = load_split(dst, "train")
    assert samples[0].mask[12, 2] == 8 and samples[0].mask[19, 0] == 0


def test_missing_subjects_are_skipped_with_a_warning(tmp_path):
    write_v5(tmp_path / "Subject_03.mat", subject(3))
    with pytest.warns(UserWarning) as caught:
        counts = prepare_duke(tmp_path, tmp_path / "out", {"train": [3, 4], "test": [5]})
    messages = [str(w.message) for w in caught]
    assert len(messages) == 2
    assert "Subject_04.mat not found" in messages[0] and "Subject_05.mat not found" in messages[1]
    assert counts == {"train": 2, "test": 0}
    assert not (tmp_path / "out" / "test").exists()


def test_no_subject_found(tmp_path):
    with pytest.warns(UserWarning), pytest.raises(DataError, match="no subject file found.*Subject_01.mat"):
        prepare_duke(tmp_path, tmp_path / "out")


def test_missing_field_is_named(tmp_path):
    fields = subject(1)
    del fields["manualFluid1"]
    write_v73(tmp_path / "Subject_01.mat", fields)
    with pytest.raises(DataError, match="Subject_01.mat has no field 'manualFluid1'"):
        prepare_duke(tmp_path, tmp_path / "out", {"train": [1]})


def test_bad_inputs(tmp_path):
    with pytest.raises(DataError, match="nowhere does not exist"):
        prepare_duke(tmp_path / "nowhere", tmp_path / "out")
    with pytest.raises(DataError, match="subject 2 is in both 'train' and 'val'"):
        prepare_duke(tmp_path, tmp_path / "out", {"train": [1, 2], "val": [2]})
    with pytest.raises(DataError, match="unknown split 'dev'"):
        prepare_duke(tmp_path, tmp_path / "out", {"dev": [1]})

    (tmp_path / "Subject_01.mat").write_bytes(b"not a matlab file at all" * 10)
    with pytest.raises(DataError, match="Subject_01.mat is not a readable MATLAB file"):
        prepare_duke(tmp_path, tmp_path / "out", {"train": [1]})

    fields = subject(1)
    fields["manualLayers1"][0, 2, 1] = 0  # a 0-based row slipped in
    write_v5(tmp_path / "Subject_01.mat", fields)
    with pytest.raises(DataError, match="manualLayers1, B-scan 2: boundary row 0 .*rows 1..20"):
        prepare_duke(tmp_path, tmp_path / "out", {"train": [1]})

    fields = subject(1)
    fields["manualLayers1"] = fields["manualLayers1"][:7]
    write_v5(tmp_path / "Subject_01.mat", fields)
    with pytest.raises(DataError, match="'manualLayers1' has shape \\(7, 12, 3\\); expected \\(8, 12, 3\\)"):
        prepare_duke(tmp_path, tmp_path / "out", {"train": [1]})
