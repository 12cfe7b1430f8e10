"""Privacy units and Poisson sampling of whole units (user-level DP, McMahan et al. 2018).

With ``privacy_unit=subject`` the unit that ε protects is a patient, not a B-scan: every
step includes each subject independently with probability q and all of an included
subject's B-scans, adjacent in the batch, so that the DP optimizer can sum them into
one gradient per subject and clip that.

Which B-scans share a subject is read from the names: Duke's ``Subject_SS_kk`` (the
grouping :mod:`dpstudy.data.holdout` uses). Every phantom scan (``phantom_<seed>_<i>``)
is its own subject: each is drawn from its own random stream, so no two share a person;
so is every audit canary (``canary_<i>``, :mod:`dpstudy.data.canary_images`).
Any other name is refused rather than guessed, since a wrong grouping would make the
subject-level guarantee false.
"""

from __future__ import annotations

import math
import re

from opacus.data_loader import wrap_collate_with_empty
from opacus.utils.uniform_sampler import UniformWithReplacementSampler
from torch.utils.data import DataLoader, Sampler
from torch.utils.data._utils.collate import default_collate

from dpstudy.data.canary_images import is_canary
from dpstudy.data.holdout import subject_of
from dpstudy.errors import ConfigError, DataError

_SUBJECT_SCAN = re.compile(r"Subject_\d+_\d+")
_PHANTOM_SCAN = re.compile(r"phantom_\d+_\d+")


def unit_of(name: str) -> str:
    """The subject a B-scan belongs to (a phantom scan or a canary is its own)."""
    if _SUBJECT_SCAN.fullmatch(name):
        return subject_of(name)
    if _PHANTOM_SCAN.fullmatch(name) or is_canary(name):
        return name
    raise DataError(f"B-scan {name!r}: cannot tell which subject it belongs to; "
                    f"privacy_unit=subject needs names Subject_<id>_<scan> "
                    f"(as prepare-duke writes them) or phantom scans")


def group_by_unit(names: list[str]) -> list[list[int]]:
    """Indices of ``names`` grouped by subject, subjects in order of first appearance."""
    groups: dict[str, list[int]] = {}
    for i, name in enumerate(names):
        groups.setdefault(unit_of(name), []).append(i)
    return list(groups.values())


class UnitPoissonSampler(Sampler[list[int]]):
    """Batches of whole units: each unit included with probability ``sample_rate``.

    ``sizes`` holds the B-scan counts of the units in the batch last drawn, in batch
    order; the optimizer reads it when it clips that batch (single-process loading
    draws a batch just before the loop receives it).
    """

    def __init__(self, groups: list[list[int]], sample_rate: float, steps: int,
                 generator=None):
        self.groups = groups
        self.sample_rate = sample_rate
        self._units = UniformWithReplacementSampler(
            num_samples=len(groups), sample_rate=sample_rate, generator=generator, steps=steps)
        self.sizes: list[int] = []

    def __len__(self) -> int:
        return len(self._units)

    def __iter__(self):
        for chosen in self._units:
            self.sizes = [len(self.groups[u]) for u in chosen]
            yield [i for u in chosen for i in self.groups[u]]


def unit_loader(dataset, batch_size: int, generator=None) -> DataLoader:
    """Poisson loader over subjects, sized like Opacus's loader over samples.

    Opacus turns a loader of N samples and batch size B into q = 1/⌈N/B⌉ with ⌈N/B⌉ steps
    per epoch; here N is the number of subjects, so ``batch_size`` is the expected number
    of subjects per batch (at most B). ``dataset`` needs ``names``; single-process only.
    """
    groups = group_by_unit(list(dataset.names))
    if batch_size > len(groups):
        raise ConfigError(f"batch_size={batch_size} is larger than the number of training "
                        f"subjects ({len(groups)}); with privacy_unit=subject the batch "
                        f"size counts subjects")
    steps = math.ceil(len(groups) / batch_size)
    sampler = UnitPoissonSampler(groups, 1.0 / steps, steps, generator)
    first = dataset[0]
    collate = wrap_collate_with_empty(
        collate_fn=default_collate, sample_empty_shapes=[(0, *x.shape) for x in first],
        dtypes=[x.dtype for x in first])
    return DataLoader(dataset, batch_sampler=sampler, collate_fn=collate)
