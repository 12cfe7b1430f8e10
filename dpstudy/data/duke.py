"""Reading the prepared Duke DME data: ``<root>/<split>/{images,masks}/<name>.npy``.

Every file is validated as it is read, because a silently wrong mask (a shifted label,
a transposed array) would not crash training; it would just make the study wrong.
"""

from pathlib import Path

import numpy as np

from dpstudy.classes import N_RAW_LABELS, RAW_TO_CLASS
from dpstudy.data.sample import Sample
from dpstudy.errors import DataError

SPLITS = ("train", "val", "test")
LAYOUT = "<root>/<split>/images/<name>.npy with masks of the same name in <root>/<split>/masks/"


def available_splits(root) -> list[str]:
    """The splits under ``root`` that have an ``images`` folder, in ``SPLITS`` order."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"Duke data folder {root} does not exist or is not a folder; expected {LAYOUT}")
    found = [s for s in SPLITS if (root / s / "images").is_dir()]
    if not found:
        raise DataError(
            f"Duke data folder {root} holds none of the splits {', '.join(SPLITS)}; expected {LAYOUT}"
        )
    return found


def map_raw_labels(raw: np.ndarray, where: str) -> np.ndarray:
    """Map raw Duke labels 0..9 to training classes 0..8 (``uint8``).

    Any numeric dtype is accepted (masks from other tools are often float), but every
    value must be a whole number in 0..9: a rounding or casting slip upstream must fail
    here, not turn into plausible-looking wrong labels.
    """
    raw = np.asarray(raw)
    if raw.dtype.kind not in "biuf":
        raise DataError(f"{where}: labels have dtype {raw.dtype}; expected integers 0..{N_RAW_LABELS - 1}")
    if raw.dtype.kind == "f":
        if not np.isfinite(raw).all():
            raise DataError(f"{where}: labels contain NaN or infinity; expected integers 0..{N_RAW_LABELS - 1}")
        if (raw != np.round(raw)).any():
            bad = raw[raw != np.round(raw)].flat[0]
            raise DataError(f"{where}: label {bad} is not a whole number; expected integers 0..{N_RAW_LABELS - 1}")
    if raw.size and (raw.min() < 0 or raw.max() >= N_RAW_LABELS):
        bad = sorted({int(v) for v in np.unique(raw) if not 0 <= v < N_RAW_LABELS})
        raise DataError(f"{where}: labels {bad[:5]} are out of range; expected integers 0..{N_RAW_LABELS - 1}")
    return RAW_TO_CLASS[raw.astype(np.intp)]


def load_split(root, split: str, limit: int | None = None) -> list[Sample]:
    """All samples of one split, sorted by name; ``limit`` keeps the first N (quick runs)."""
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
    if limit is not None and limit < 1:
        raise DataError(f"limit={limit} is invalid: use a positive number of scans, or no limit")
    images_dir = Path(root) / split / "images"
    masks_dir = Path(root) / split / "masks"
    if not images_dir.is_dir():
        raise DataError(f"split folder {images_dir} does not exist; expected {LAYOUT}")
    # dot-files are operating-system clutter (.DS_Store), not data
    files = sorted(p for p in images_dir.iterdir() if not p.name.startswith("."))
    if not files:
        raise DataError(f"split folder {images_dir} is empty; expected {LAYOUT}")
    for path in files:
        if path.suffix != ".npy" or not path.is_file():
            raise DataError(f"{path} is not a .npy file; {images_dir} must hold only .npy B-scans")
    if not masks_dir.is_dir():
        raise DataError(f"{images_dir} has images but {masks_dir} does not exist; expected {LAYOUT}")
    return [_load_pair(path, masks_dir / path.name) for path in files[:limit]]


def _load_pair(image_path: Path, mask_path: Path) -> Sample:
    if not mask_path.is_file():
        raise DataError(f"image {image_path} has no mask: {mask_path} does not exist")
    image = _load_2d(image_path)
    mask = _load_2d(mask_path)
    if image.shape != mask.shape:
        raise DataError(
            f"{image_path} has shape {image.shape} but its mask {mask_path} has shape {mask.shape}; "
            "they must match pixel for pixel"
        )
    if image.dtype != np.uint8:
        if image.dtype.kind not in "biuf" or not np.isfinite(image).all():
            raise DataError(f"{image_path}: intensities must be finite numbers; got dtype {image.dtype}")
        image = image.astype(np.float32)
    return Sample(image_path.stem, image, map_raw_labels(mask, str(mask_path)))


def _load_2d(path: Path) -> np.ndarray:
    try:
        arr = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise DataError(
            f"{path} is not a readable .npy array ({exc}); re-create it with numpy.save "
            "(plain numeric arrays only)"
        ) from None
    if not isinstance(arr, np.ndarray):  # np.load returns an archive for .npz content
        arr.close()
        raise DataError(f"{path} holds a .npz archive, not a .npy array; save each B-scan with numpy.save")
    if arr.ndim != 2:
        raise DataError(f"{path} has shape {arr.shape}; expected a 2-D array (rows, columns)")
    if arr.size == 0:
        raise DataError(f"{path} is empty (shape {arr.shape}); expected a 2-D B-scan")
    return arr
