"""Convert the original Duke DME distribution (``Subject_XX.mat``) into ``.npy`` splits.

The original files hold 61 B-scans per subject of which 11 are annotated, with layer
*boundaries* rather than masks. The study trains on per-pixel masks, so this module
turns boundaries into the 10 raw Duke labels once, reproducibly, and writes the layout
that :mod:`dpstudy.data.duke` reads.

Row convention: MATLAB boundary rows are 1-based. A boundary value ``v`` is rounded to
the nearest whole row and becomes the 0-based row ``round(v) - 1``; that row is the
first row of the layer *below* the boundary. So a column with ``manualLayers1`` values
``v0..v7`` gets label 0 on rows ``< round(v0) - 1``, label ``k + 1`` on rows from
``round(vk) - 1`` up to (not including) ``round(v(k+1)) - 1``, and label 8 from
``round(v7) - 1`` down; fluid pixels (``manualFluid1 != 0``) then become label 9.
"""

import warnings
from pathlib import Path

import h5py
import numpy as np
import scipy.io

from dpstudy.data.duke import SPLITS
from dpstudy.errors import DataError

DEFAULT_SPLIT_SUBJECTS = {"train": [1, 2, 3, 4, 5, 6], "val": [7, 8], "test": [9, 10]}
FIELDS = ("images", "manualLayers1", "manualFluid1")
N_BOUNDARIES = 8


def prepare_duke(src, dst, split_subjects: dict[str, list[int]] | None = None) -> dict[str, int]:
    """Write ``dst/<split>/{images,masks}/Subject_XX_YY.npy``; return the scan count per split.

    ``YY`` counts the annotated scans of a subject (00..10 for Duke). Subjects whose file
    is missing are skipped with a warning, so a partial download still yields usable
    splits; finding no subject at all is an error.
    """
    split_subjects = DEFAULT_SPLIT_SUBJECTS if split_subjects is None else split_subjects
    _check_split_subjects(split_subjects)
    src, dst = Path(src), Path(dst)
    if not src.is_dir():
        raise DataError(f"Duke source folder {src} does not exist; it must hold Subject_01.mat … Subject_10.mat")
    counts, found = {}, 0
    for split, subjects in split_subjects.items():
        counts[split] = 0
        for subject in subjects:
            path = src / f"Subject_{subject:02d}.mat"
            if not path.is_file():
                warnings.warn(f"{path} not found; subject {subject} is skipped ({split} split)", stacklevel=2)
                continue
            found += 1
            scans = subject_scans(path)
            if not scans:
                warnings.warn(f"{path} has no B-scan with all 8 layer boundaries annotated; skipped", stacklevel=2)
                continue
            for dirname in ("images", "masks"):
                (dst / split / dirname).mkdir(parents=True, exist_ok=True)
            for i, (image, mask) in enumerate(scans):
                name = f"Subject_{subject:02d}_{i:02d}.npy"
                np.save(dst / split / "images" / name, image)
                np.save(dst / split / "masks" / name, mask)
            counts[split] += len(scans)
    if not found:
        wanted = sorted(s for subjects in split_subjects.values() for s in subjects)
        raise DataError(
            f"no subject file found in {src}: expected "
            + ", ".join(f"Subject_{s:02d}.mat" for s in wanted)
        )
    return counts


def subject_scans(path: Path) -> list[tuple[np.ndarray, np.ndarray]]:
    """``(uint8 image, uint8 raw mask)`` for each annotated B-scan of one subject file."""
    images, layers, fluid = _read_fields(path)
    height = images.shape[0]
    out = []
    for j in range(images.shape[2]):
        bounds = layers[:, :, j]
        complete = np.flatnonzero(np.isfinite(bounds).all(axis=0))
        if complete.size == 0:
            continue  # an unannotated scan
        cols = slice(complete[0], complete[-1] + 1)
        rows = _boundary_rows(bounds[:, cols], height, f"{path}: manualLayers1, B-scan {j + 1}")
        mask = np.zeros((height, rows.shape[1]), np.uint8)
        r = np.arange(height)[:, None]
        for k in range(N_BOUNDARIES):  # each boundary starts the layer below it
            mask[r >= rows[k]] = k + 1
        mask[np.nan_to_num(fluid[:, cols, j]) != 0] = 9
        out.append((_as_uint8(images[:, cols, j], f"{path}: images, B-scan {j + 1}"), mask))
    return out


def _boundary_rows(bounds: np.ndarray, height: int, where: str) -> np.ndarray:
    """0-based first row below each boundary; gaps inside the annotated range are bridged.

    A column missing some boundary between fully annotated columns is interpolated
    from its neighbours rather than dropped, so the B-scan keeps its true geometry.
    """
    bounds = bounds.copy()
    cols = np.arange(bounds.shape[1])
    for b in bounds:
        ok = np.isfinite(b)
        b[~ok] = np.interp(cols[~ok], cols[ok], b[ok])
    rows = np.rint(bounds).astype(int)
    if rows.min() < 1 or rows.max() > height:
        bad = bounds.flat[np.argmin(rows)] if rows.min() < 1 else bounds.flat[np.argmax(rows)]
        raise DataError(f"{where}: boundary row {bad:g} is outside the image; expected MATLAB rows 1..{height}")
    return rows - 1


def _as_uint8(image: np.ndarray, where: str) -> np.ndarray:
    if image.dtype == np.uint8:
        return np.ascontiguousarray(image)
    if image.dtype.kind not in "iuf" or not np.isfinite(image).all() or image.min() < 0 or image.max() > 255:
        raise DataError(f"{where}: intensities must be finite numbers in 0..255; got dtype {image.dtype}")
    return np.rint(image).astype(np.uint8)


def _read_fields(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The three fields as ``(H, W, N)``, ``(8, W, N)``, ``(H, W, N)`` arrays.

    MATLAB v7.3 files are HDF5; h5py sees their arrays with the axes reversed
    (MATLAB is column-major), hence the transpose.
    """
    try:
        if h5py.is_hdf5(path):
            with h5py.File(path, "r") as f:
                data = {name: np.asarray(f[name]).T for name in FIELDS if name in f}
        else:
            data = scipy.io.loadmat(path, variable_names=FIELDS)
    except (OSError, ValueError, TypeError, IndexError, scipy.io.matlab.MatReadError) as exc:
        raise DataError(f"{path} is not a readable MATLAB file ({exc}); re-download the Duke DME data") from None
    for name in FIELDS:
        if name not in data:
            raise DataError(f"{path} has no field {name!r}; a Duke DME subject file has {', '.join(FIELDS)}")
    images, layers, fluid = (np.asarray(data[name]) for name in FIELDS)
    if images.ndim != 3:
        raise DataError(f"{path}: field 'images' has shape {images.shape}; expected rows × columns × B-scans")
    h, w, n = images.shape
    if layers.shape != (N_BOUNDARIES, w, n):
        raise DataError(
            f"{path}: field 'manualLayers1' has shape {layers.shape}; expected {(N_BOUNDARIES, w, n)} "
            "(8 boundaries × columns × B-scans, matching 'images')"
        )
    if fluid.shape != (h, w, n):
        raise DataError(f"{path}: field 'manualFluid1' has shape {fluid.shape}; expected {(h, w, n)} like 'images'")
    if layers.dtype.kind not in "iuf":
        raise DataError(f"{path}: field 'manualLayers1' has dtype {layers.dtype}; expected numeric boundary rows")
    return images, layers.astype(np.float64), fluid


def _check_split_subjects(split_subjects: dict[str, list[int]]) -> None:
    seen: dict[int, str] = {}
    for split, subjects in split_subjects.items():
        if split not in SPLITS:
            raise DataError(f"unknown split {split!r} in split_subjects; use {', '.join(SPLITS)}")
        for subject in subjects:
            if not isinstance(subject, (int, np.integer)) or not 1 <= subject <= 99:
                raise DataError(f"subject {subject!r} in split {split!r} is invalid; use subject numbers 1..99")
            if subject in seen:
                raise DataError(
                    f"subject {subject} is in both {seen[subject]!r} and {split!r}; "
                    "a subject's scans must stay in one split to keep the evaluation honest"
                )
            seen[subject] = split
