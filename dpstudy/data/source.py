"""Where the data comes from: Duke files or the embedded synthetic phantom.

Runs record the bundle's fingerprint, so results obtained on different data (another
preparation, a ``limit``, the phantom) can never be mixed up silently.

The phantom's spec is ``synthetic`` (the standard phantom, Duke's split sizes) or
``synthetic:key=value,...`` with keys ``n`` (training scans) and ``dr`` (domain
randomisation strength, 0..1), e.g. ``synthetic:n=600,dr=1``.
"""

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy

from dpstudy import classes
from dpstudy.data import phantom as phantom_module
from dpstudy.data.cache import cached_arrays
from dpstudy.data.duke import available_splits, load_split
from dpstudy.data.sample import Sample
from dpstudy.errors import DataError

SYNTHETIC = "synthetic"
#: seed of the phantom used as the default data set
SYNTHETIC_SEED = 0
#: the phantom's split sizes: Duke's
SYNTHETIC_SIZES = {"train": 66, "val": 22, "test": 22}


@dataclass(frozen=True)
class SyntheticSpec:
    """The phantom a ``synthetic[:...]`` spec asks for: training scans and randomisation."""

    n: int = SYNTHETIC_SIZES["train"]
    dr: float = 0.0

    def describe(self) -> str:
        return "standard" if self.dr == 0 else f"domain-randomised, dr={self.dr:g}"


#: the spec's keys: meaning, valid values, how to read a value and check it
_SPEC_KEYS = {
    "n": ("training scans", "an integer >= 1", int, lambda v: v >= 1),
    "dr": ("domain randomisation strength", "a number in [0, 1]", float, lambda v: 0 <= v <= 1),
}


def parse_synthetic_spec(spec: str) -> SyntheticSpec | None:
    """The phantom ``spec`` asks for, or None if it is not a ``synthetic[:...]`` spec."""
    if spec != SYNTHETIC and not spec.startswith(SYNTHETIC + ":"):
        return None
    valid = ", ".join(f"{k} ({meaning}, {values})" for k, (meaning, values, _, _) in _SPEC_KEYS.items())
    fields = {}
    for item in spec[len(SYNTHETIC) + 1:].split(",") if spec != SYNTHETIC else []:
        key, eq, value = (part.strip() for part in item.partition("="))
        if key not in _SPEC_KEYS or not eq:
            problem = f"unknown key {key!r}" if key not in _SPEC_KEYS else f"{item.strip()!r} is not key=value"
            raise DataError(f"data spec {spec!r}: {problem}; valid keys: {valid}, e.g. synthetic:n=600,dr=1")
        if key in fields:
            raise DataError(f"data spec {spec!r}: key {key!r} is given twice")
        meaning, values, cast, ok = _SPEC_KEYS[key]
        try:
            fields[key] = cast(value)
            valid_value = ok(fields[key])
        except ValueError:
            valid_value = False
        if not valid_value:
            raise DataError(f"data spec {spec!r}: {key}={value!r} is invalid; {key} ({meaning}) must be {values}")
    return SyntheticSpec(**fields)
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
        variant = parse_synthetic_spec(self.spec).describe()
        return f"synthetic OCT phantom (seed {SYNTHETIC_SEED}, {variant}): {counts} — no Duke data configured"


def load_data(spec: str, limit: int | None = None) -> DataBundle:
    """Load every available split of ``spec`` (a Duke folder or ``"synthetic[:...]"``).

    ``limit`` keeps the first N scans of each split, for quick runs.
    """
    phantom = parse_synthetic_spec(spec)
    if phantom is not None:
        if limit is not None and limit < 1:
            raise DataError(f"limit={limit} is invalid: use a positive number of scans, or no limit")
        splits = _synthetic_splits(phantom, limit)
        return DataBundle(spec, "synthetic", None, splits, fingerprint(splits))
    root = Path(spec).expanduser().resolve()
    if not root.exists():
        raise DataError(
            f"data folder {root} does not exist; use --data synthetic for the built-in phantom, "
            "or create it from the original Duke .mat files with `dpstudy prepare-duke`"
        )
    splits = {split: load_split(root, split, limit) for split in available_splits(root)}
    return DataBundle(spec, "duke", str(root), splits, fingerprint(splits))


def _synthetic_splits(phantom: SyntheticSpec, limit: int | None) -> dict[str, list[Sample]]:
    """The phantom's splits; whole bundles come from the on-disk cache once generated
    (a ``limit`` is for quick runs: generated directly, a prefix of the whole)."""
    n = {f"n_{split}": count for split, count in {**SYNTHETIC_SIZES, "train": phantom.n}.items()}
    if limit is not None:
        return phantom_module.phantom_splits(seed=SYNTHETIC_SEED, dr=phantom.dr, **{k: min(v, limit) for k, v in n.items()})

    def build() -> dict[str, np.ndarray]:
        splits = phantom_module.phantom_splits(seed=SYNTHETIC_SEED, dr=phantom.dr, **n)
        return {f"{split}.{part}": np.stack([getattr(s, part) for s in samples])
                for split, samples in splits.items() for part in ("name", "image", "mask")}

    key = {"seed": SYNTHETIC_SEED, "dr": phantom.dr, **n, "numpy": np.__version__, "scipy": scipy.__version__}
    arrays = cached_arrays("phantom", key, [phantom_module.__file__, classes.__file__], build)
    return {split: [Sample(str(name), image, mask) for name, image, mask in
                    zip(arrays[f"{split}.name"], arrays[f"{split}.image"], arrays[f"{split}.mask"])]
            for split in SYNTHETIC_SIZES}


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
