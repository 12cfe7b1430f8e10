"""How long runs will take on this machine, said before they start.

A run costs a start-up plus, per epoch, work proportional to the images it sees (the
training images times the augmentation copies, plus half as much per validation image),
the pixels per image and the square of the base width (convolution cost). The seconds
one unit of that work takes depend on the model and on whether per-sample gradients are
needed (DP); they are the median measured over this store's completed runs of the same
kind (a run's recorded duration starts after its data is loaded), or, without any, the
study's own timings.
"""

from __future__ import annotations

import heapq
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from .config import RunConfig
from .data.source import SYNTHETIC_SIZES, parse_synthetic_spec
from .errors import StoreError

#: The reference epoch: 66 training and 22 validation B-scans at 128×128, base width 8.
REFERENCE_IMAGES, REFERENCE_PIXELS, REFERENCE_WIDTH = 66 + 22 / 2, 128 * 128, 8
#: Cost per epoch grows as width ** WIDTH_EXPONENT, not width² (the multiply-adds):
#: at these sizes memory-bound passes over activations, linear in the width, weigh as
#: much; width 16, depth 4 took 1.75× width 8, depth 3 per epoch here (2 ** 0.81).
WIDTH_EXPONENT = 0.8
#: Seconds per reference epoch by (model, private), measured on the development machine
#: (2 cores, two runs at once): U-Net 122 s non-private and 165 s DP for 30 epochs
#: (results/matched/summary.csv); Nested U-Net about 1.8× U-Net (quick profile's sizing).
PRIOR_S = {("unet", False): 4.0, ("unet", True): 5.5,
           ("nested_unet", False): 7.2, ("nested_unet", True): 10.0}
#: Interpreter and torch start-up and data loading, which a run's recorded duration
#: leaves out; generating the phantom costs more per scan than reading a Duke file (CPU
#: seconds measured here: imports 7 s, the 110-scan phantom 8.7 s).
START_S, PHANTOM_S_PER_SCAN = 8.0, 0.08
#: Runs smaller than this many reference epochs per epoch are left out of the
#: calibration: fixed costs dominate smoke runs, which say little about the cost per image.
MIN_UNITS = 0.1


def data_sizes(spec: str, limit: int | None = None) -> tuple[int, int]:
    """(training, validation) B-scans of a data spec: a phantom's from its spec
    (``synthetic:n=600`` trains on 600), a folder's by counting files (no loading)."""
    phantom = parse_synthetic_spec(spec)
    if phantom is not None:
        n = phantom.n, SYNTHETIC_SIZES["val"]
    else:
        n = tuple(len(list((Path(spec).expanduser() / split / "images").glob("*.npy")))
                  for split in ("train", "val"))
    return tuple(min(v, limit) if limit else v for v in n)


def epoch_units(cfg: RunConfig, n_trained: int, n_val: int) -> float:
    """One epoch of ``cfg`` on ``n_trained`` training B-scans, in reference epochs."""
    images = n_trained * cfg.aug_multiplicity + n_val / 2
    height, width = cfg.image_size
    return (images / REFERENCE_IMAGES * height * width / REFERENCE_PIXELS
            * (cfg.base_width / REFERENCE_WIDTH) ** WIDTH_EXPONENT)


def _kinds(cfg: RunConfig) -> tuple[tuple, tuple]:
    """The keys a run is timed under: its exact architecture first, then (model, private).
    :data:`WIDTH_EXPONENT` is one machine's measurement, so a run of the same
    architecture is the better yardstick where one exists."""
    kind = (cfg.model, cfg.private)
    return (*kind, cfg.base_width, cfg.depth, tuple(cfg.image_size)), kind


@dataclass
class Estimator:
    """Seconds per reference epoch by (model, private) and by (model, private, width,
    depth, image size), each measured on ``counts`` runs."""

    rates: dict = field(default_factory=lambda: dict(PRIOR_S))
    counts: dict = field(default_factory=dict)

    def seconds(self, cfg: RunConfig, n_train: int, n_val: int) -> float:
        """A run of ``cfg`` on a training split of ``n_train`` B-scans (some of which
        ``audit_holdout`` keeps out)."""
        units = epoch_units(cfg, n_train * (1 - cfg.audit_holdout), n_val)
        start = START_S + (PHANTOM_S_PER_SCAN * (n_train + 2 * n_val)  # val and test alike
                           if parse_synthetic_spec(cfg.data) else 0.0)
        rate = next(self.rates[k] for k in _kinds(cfg) if k in self.rates)
        return start + cfg.epochs * units * rate

    def basis(self, configs: list[RunConfig]) -> str:
        """Where the estimate of ``configs`` comes from, in words."""
        used = {next((k for k in _kinds(c) if k in self.counts), None) for c in configs}
        n = sum(self.counts[k] for k in used - {None})
        return (f"calibrated on {n} completed run{'s' * (n != 1)} of the same kind here" if n
                else "from the study's timings on a 2-core CPU; no completed run of this "
                     "kind here is large enough to time")


def calibrate(metas: list[dict]) -> Estimator:
    """An :class:`Estimator` from completed runs' metadata (``config.json`` contents)."""
    samples: dict[tuple, list[float]] = {}
    for meta in metas:
        try:
            cfg = RunConfig.from_dict(meta["config"])
            data = meta["data"]
            per_epoch = epoch_units(cfg, data["n_train"], data["n_val"])
            seconds, epochs = float(meta["duration_s"]), int(meta["epochs_done"])
        except Exception:  # noqa: BLE001 — a run this version cannot read is no sample
            continue
        if meta.get("status") == "completed" and per_epoch >= MIN_UNITS and epochs > 0:
            for kind in _kinds(cfg):
                samples.setdefault(kind, []).append(seconds / (epochs * per_epoch))
    return Estimator({**PRIOR_S, **{k: statistics.median(v) for k, v in samples.items()}},
                     {k: len(v) for k, v in samples.items()})


def calibrate_store(store) -> Estimator:
    """:func:`calibrate` on every run of a :class:`~dpstudy.store.RunStore` it can read."""
    metas = []
    for run_id in store.run_ids():
        try:
            metas.append(store.read_meta(run_id))
        except StoreError:
            continue
    return calibrate(metas)


def remaining_seconds(est: Estimator, todo: list[RunConfig], jobs: int) -> float:
    """Wall time until every run of ``todo`` (the runs not yet completed) is done on
    ``jobs`` workers: the runs others start from (pretraining) in a first wave, as a
    sweep does."""
    first = {c.init_from for c in todo}
    waves = [[est.seconds(c, *data_sizes(c.data, c.limit)) for c in todo
              if (c.run_id() in first) == wave] for wave in (True, False)]
    return makespan(waves, jobs)


def makespan(seconds: list[list[float]], jobs: int) -> float:
    """Wall time of waves of runs (each wave after the previous one) on ``jobs`` workers,
    each worker taking the next run when it is free."""
    total = 0.0
    for wave in seconds:
        workers = [0.0] * max(1, min(jobs, len(wave)))
        for s in wave:
            heapq.heappush(workers, heapq.heappop(workers) + s)
        total += max(workers, default=0.0)
    return total


def duration_text(seconds: float) -> str:
    """``"about 3 min"``: rounded as an estimate deserves."""
    if seconds < 90:
        return f"about {max(10, round(seconds, -1)):.0f} s"
    if seconds < 90 * 60:
        return f"about {round(seconds / 60):.0f} min"
    return f"about {seconds / 3600:.1f} h"
