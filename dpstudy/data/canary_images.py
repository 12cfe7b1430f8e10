"""Canary B-scans for the input-space one-run audit (:mod:`dpstudy.privacy.one_run_audit`).

The white-box audit (:mod:`dpstudy.privacy.canaries`) inserts gradients and watches every
noised update. This one is the setting of a real attacker: m canary *B-scans* enter the
training split like any image, each independently with probability ½, and the auditor
sees only the final model. It scores each canary by how much training lowered its loss
(loss at the starting weights minus loss at the final weights, :func:`dpstudy.audit.
canary_image_audit`) and guesses "included" for the highest scores.

**Which canaries.** Public data only, so that adding them reveals nothing private: scan
``i`` is phantom scan ``i`` of stream :data:`IMAGE_SEED` (:func:`~dpstudy.data.phantom.
phantom_pairs`), and its label mask is the mask of phantom scan ``i`` of another stream,
:data:`MASK_SEED` — a wrong but plausible label: real layers, fluid and geometry of another
retina (other position, tilt, thicknesses), not this image's. Mislabelled canaries are the
classical worst case of input-space audits: a correctly labelled canary is predicted well whether or not it was
trained on, since the rest of the data teaches it, so only memorisation fits a wrong label,
and the loss drop isolates exactly that. A left-right flip was not chosen: near the fovea
a retina is almost symmetric, so a flipped mask is often nearly right. Both seeds differ
from every split of the data (:func:`~dpstudy.data.phantom.phantom_splits` uses seeds
``3 · SYNTHETIC_SEED + k`` ∈ {0, 1, 2}); canary ``i`` depends only on ``i`` and the size,
so m canaries are a prefix of m + 1. Scans are generated at the training resolution
(the phantom scales its anatomy; a 496 × 512 scan costs 30× more and is resized anyway).

**Names.** ``canary_<i:04d>``: no data source writes such a name (Duke's are
``Subject_SS_kk``, the phantom's ``phantom_<seed>_<i>``), so a canary never collides with
a real B-scan, and :func:`dpstudy.data.units.unit_of` makes each canary its own
pseudo-subject: with ``privacy_unit=subject`` each canary is one privacy unit, and the
most B-scans a real subject contributes (group privacy) is unchanged.

**Which are included.** Each independently with probability ½ from the run's canary
stream (:func:`dpstudy.methods.random_seed`, stream 5); the draw is recorded in the
run's ``one_run_audit_input`` block. Included canaries are training units like any
B-scan: they count in N, the sampling rate q and the accountant. Like the white-box
canaries they change the run, so ``audit_canary_images`` is part of the run's identity.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from dpstudy.classes import RAW_TO_CLASS
from dpstudy.data.phantom import MIN_SIZE, phantom_pairs
from dpstudy.data.sample import Sample

#: phantom stream of the canary images, and of the (wrong) masks they are given
IMAGE_SEED, MASK_SEED = 7_000_001, 7_000_002
#: how the wrong label is made, as recorded in the run
LABEL = "mask of another phantom scan (stream MASK_SEED)"
_NAME = re.compile(r"canary_\d{4,}")


def canary_name(i: int) -> str:
    return f"canary_{i:04d}"


def is_canary(name: str) -> bool:
    return bool(_NAME.fullmatch(name))


def make_canaries(m: int, image_size: tuple[int, int]) -> list[Sample]:
    """The m canary B-scans (images of one phantom stream, masks of another)."""
    h, w = (max(int(s), MIN_SIZE) for s in image_size)
    images = phantom_pairs(m, IMAGE_SEED, h, w)
    masks = phantom_pairs(m, MASK_SEED, h, w)
    return [Sample(canary_name(i), image, RAW_TO_CLASS[raw])
            for i, ((image, _), (_, raw)) in enumerate(zip(images, masks))]


def draw_included(m: int, seed: int) -> np.ndarray:
    """Which of m canaries are included: each independently with probability ½."""
    return np.random.default_rng(seed).random(m) < 0.5


@dataclass(frozen=True)
class CanaryImages:
    """The canaries of one run and the draw that decided which ones it trains on."""

    samples: list[Sample]
    included: np.ndarray          # bool [m]

    @classmethod
    def for_run(cls, m: int, seed: int, image_size: tuple[int, int]) -> CanaryImages:
        return cls(make_canaries(m, image_size), draw_included(m, seed))

    @property
    def members(self) -> list[Sample]:
        """The included canaries: appended to the training split."""
        return [s for s, inc in zip(self.samples, self.included) if inc]

    def record(self) -> dict:
        """What the run stores about its canaries (the draw included)."""
        return {"label": LABEL, "image_seed": IMAGE_SEED, "mask_seed": MASK_SEED,
                "names": [s.name for s in self.samples],
                "included": [bool(v) for v in self.included]}
