"""Where the data comes from: Duke files or the embedded synthetic phantom.

Runs record the bundle's fingerprint, so results obtained on different data (another
preparation, a ``limit``, the phantom) can never be mixed up silently.
"""

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from dpstudy.data.duke import available_splits, load_split
from dpstudy.data.phantom import phantom_splits
from dpstudy.data.sample import Sample
from dpstudy.errors import DataError

SYNTHETIC = "synthetic"
#: seed of the phantom used as the default data set
SYNTHETIC_SEED = 0
#: scans per split of the phantom used as the default data set
SYNTHETIC_SIZES = {"train": 66, "val": 22, "test": 22}
#: where ``dpstudy prepare-duke`` writes by default, relative to the working directory
DEFAULT_DUKE_DIR = Path("data") / "DukeData"


def resolve_data_spec(arg: str | None) -> str:
    """The data to use: ``arg``, else ``$DPSTUDY_DATA``, else ``./data/DukeData`` if it has a
    train or val split, else the synthetic phantom. Empty strings count as unset.

    The local folder is returned as an absolute path, so logs say exactly what was read.
    """
    if arg:
        return arg
    env = os.environ.get("DPSTUDY_DATA")
    if env:
        return env
    if any((DEFAULT_DUKE_DIR / split / "images").is_dir() for split in ("train", "val")):
        return str(DEFAULT_DUKE_DIR.resolve())
    return SYNTHETIC


@dataclass
class DataBundle:
    """The loaded splits plus what is needed to describe and identify them."""

    spec: str
    kind: str  # "duke" | "synthetic"
    root: str | None
    splits: dict[str, list[Sample]]
    fingerprint: str

    def describe(self) -> str:
        counts = ", ".join(f"{split} {len(samples)}" for split, samples in self.splits.items())
        if self.kind == "duke":
            return f"Duke DME data at {self.root}: {counts}"
        return f"synthetic OCT phantom (seed {SYNTHETIC_SEED}): {counts} — no Duke data configured"


def load_data(spec: str, limit: int | None = None) -> DataBundle:
    """Load every available split of ``spec`` (a Duke folder or ``"synthetic"``).

    ``limit`` keeps the first N scans of each split, for quick runs.
    """
    if spec == SYNTHETIC:
        if limit is not None and limit < 1:
            raise DataError(f"limit={limit} is invalid: use a positive number of scans, or no limit")
        n = {f"n_{split}": count for split, count in SYNTHETIC_SIZES.items()}
        if limit is not None:
            n = {k: min(v, limit) for k, v in n.items()}
        splits = phantom_splits(seed=SYNTHETIC_SEED, **n)
        return DataBundle(spec, "synthetic", None, splits, fingerprint(splits))
    root = Path(spec).expanduser().resolve()
    if not root.exists():
        raise DataError(
            f"data folder {root} does not exist; use --data synthetic for the built-in phantom, "
            "or create it from the original Duke .mat files with `dpstudy prepare-duke`"
        )
    splits = {split: load_split(root, split, limit) for split in available_splits(root)}
    return DataBundle(spec, "duke", str(root), splits, fingerprint(splits))


def fingerprint(splits: dict[str, list[Sample]]) -> str:
    """16 hex digits of SHA-256 over split names, sample names, shapes, dtypes and bytes."""
    h = hashlib.sha256()
    for split, samples in splits.items():
        h.update(f"split:{split}\n".encode())
        for s in samples:
            for part, arr in (("image", s.image), ("mask", s.mask)):
                h.update(f"{s.name}:{part}:{arr.dtype}:{arr.shape}\n".encode())
                h.update(arr.tobytes())
    return h.hexdigest()[:16]
