"""Audit hold-out: B-scans of the training subjects kept out of training.

A membership-inference audit compares the model's losses on its training images with
those on images it never saw *from the same distribution*. On Duke, the val split is
the wrong reference: its B-scans come from other patients, whose images the model fits
worse for reasons that have nothing to do with memorisation, so the attack's AUC says
more about the patient shift than about leakage (it came out below 0.5 for every run,
non-private included). Holding out a share of every training subject's B-scans gives
non-members from the same patients. The draw is fixed (not the run's seed), so runs
that differ only by seed train on the same members and audit on the same non-members.
"""

from __future__ import annotations

import numpy as np

from dpstudy.data.sample import Sample
from dpstudy.errors import DataError

#: seed of the hold-out draw; fixed so the split is a property of the data, not the run
HOLDOUT_SEED = 1234


def subject_of(name: str) -> str:
    """``Subject_03_07`` → ``Subject_03`` (the B-scan index is the last ``_`` field)."""
    return name.rsplit("_", 1)[0]


def split_holdout(samples: list[Sample], fraction: float, seed: int = HOLDOUT_SEED
                  ) -> tuple[list[Sample], list[Sample]]:
    """(members, held out): ``⌊fraction · n⌋`` B-scans of each subject held out.

    Every subject keeps at least one member and, when ``fraction > 0``, gives at least
    one non-member, so both sets cover all training subjects. Order within each set
    follows ``samples``.
    """
    if not 0.0 <= fraction < 1.0:
        raise DataError(f"audit_holdout={fraction!r} must lie in [0, 1)")
    if fraction == 0.0:
        return list(samples), []
    groups: dict[str, list[int]] = {}
    for i, s in enumerate(samples):
        groups.setdefault(subject_of(s.name), []).append(i)
    rng = np.random.default_rng(seed)
    held: set[int] = set()
    for subject in sorted(groups):
        idx = groups[subject]
        if len(idx) < 2:
            raise DataError(f"audit_holdout={fraction}: subject {subject} has {len(idx)} "
                            f"training B-scan; holding out needs at least 2 per subject")
        k = min(max(1, int(fraction * len(idx))), len(idx) - 1)
        held.update(int(i) for i in rng.choice(idx, k, replace=False))
    return ([s for i, s in enumerate(samples) if i not in held],
            [s for i, s in enumerate(samples) if i in held])
