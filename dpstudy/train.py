"""The training loop: config → data → model → method → epochs → run store.

One loop for every method; what differs between methods lives in :mod:`dpstudy.methods`.
"""

from __future__ import annotations

import contextlib
import copy
import math
import platform
import signal
import threading
import time
from importlib import metadata
from pathlib import Path

import numpy as np
import torch
from opacus.utils.batch_memory_manager import BatchMemoryManager
from torch.utils.data import DataLoader
from tqdm import tqdm

from .audit import canary_image_audit
from .config import RunConfig
from .data.canary_images import CanaryImages
from .data.dataset import SegmentationDataset
from .data.holdout import split_holdout
from .data.source import load_data
from .averaging import WeightAverage
from .data.transforms import augment, normalisation_stats
from .data.units import group_by_unit, unit_of
from .device import describe, model_device, place_images, place_model, resolve_device
from .errors import Cancelled, ConfigError, DataError, Diverged
from .evaluate import evaluate, starting_model, unwrap
from .losses import per_sample_loss
from .metrics import dice_by_group
from .methods import build_method, random_seed
from .models import count_parameters
from .models.adapters import add_adapters, merged_state_dict
from .models.trainable import set_trainable
from .privacy.accounting import group_privacy
from .store import DIAGNOSTIC_FIELDS, RunStore, RunWriter


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for pkg in ("dpstudy", "torch", "opacus", "numpy", "dp-accounting"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[pkg] = metadata.version(pkg)
    return versions


def _check_against_data(cfg: RunConfig, n_train: int) -> None:
    if cfg.batch_size > n_train:
        raise ConfigError(f"batch_size={cfg.batch_size} is larger than the training set "
                          f"({n_train} images); use at most {n_train}")
    if cfg.private and cfg.normalisation == "train_split":   # stored legacy runs may have it
        raise ConfigError(
            f"normalisation='train_split' with method {cfg.method}: the training split's "
            f"mean and std would be released without noise, outside ε; use per_image")
    if cfg.private and cfg.delta >= 1.0 / n_train:
        raise ConfigError(f"delta={cfg.delta:g} must be < 1/N = {1.0 / n_train:.3g} "
                          f"(N = {n_train} training images)")


def _check_init_source(cfg: RunConfig, store: RunStore) -> None:
    """Starting weights come from a completed run and, for a private run, from public
    (synthetic) data only — checked along the whole chain of ``init_from`` ancestors: a
    run's ε counts its own steps, never what its weights (or theirs) saw."""
    source = store.read_meta(cfg.init_from)
    if source.get("status") != "completed":
        raise ConfigError(f"init_from={cfg.init_from}: that run is {source.get('status')}; "
                          f"only a completed run's weights can start training")
    run_id, seen = cfg.init_from, set()
    while cfg.private and run_id is not None:
        if run_id in seen:
            raise ConfigError(f"init_from={cfg.init_from}: its ancestry loops at {run_id}")
        seen.add(run_id)
        meta = source if run_id == cfg.init_from else store.read_meta(run_id)
        kind = (meta.get("data") or {}).get("kind")
        if kind != "synthetic":
            via = "" if run_id == cfg.init_from else f" (an ancestor of {cfg.init_from})"
            raise ConfigError(
                f"init_from={cfg.init_from}: run {run_id}{via} was trained on {kind} data; a "
                f"private run may only start from weights trained on public (synthetic) data "
                f"alone, since its ε does not count what the starting weights learned")
        run_id = (meta.get("config") or {}).get("init_from")


def _normalisation(cfg: RunConfig, train_samples) -> tuple[tuple[float, float] | None, dict]:
    """The dataset's stats argument and what the run records about it."""
    if cfg.normalisation == "per_image":
        return None, {"mode": "per_image", "source": "each image's own pixels (padding "
                      "excluded); no statistic of the training split"}
    mean, std = normalisation_stats(train_samples)
    return (mean, std), {"mode": "train_split", "mean": mean, "std": std,
                         "source": "training split (allowed for non-private runs only)"}


def _optimizer(cfg: RunConfig, model) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.effective_lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.effective_lr, momentum=cfg.momentum,
                           weight_decay=cfg.weight_decay)


@contextlib.contextmanager
def _cancel_on_signals():
    """Turn SIGTERM/SIGINT into :class:`Cancelled` (main thread only: signals live there)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise Cancelled(signal.Signals(signum).name)

    old = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def _augmented(x, y, k: int, generator: torch.Generator):
    """K augmented copies of every sample, a sample's copies adjacent (the DP optimizer
    averages their gradients before clipping)."""
    if len(x) == 0:
        return x, y
    pairs = [augment(xi, yi, generator) for xi, yi in zip(x, y) for _ in range(k)]
    return torch.stack([a for a, _ in pairs]), torch.stack([b for _, b in pairs])


def _train_epoch(model, optimizer, loader, method, after_step, epoch, cfg, progress,
                 aug_generator):
    """One pass over the (Poisson-sampled, for DP) loader; returns mean per-sample loss
    and the number of logical steps. ``after_step`` runs after each logical step."""
    model.train()
    steps_per_epoch = len(loader)  # logical batches; physical ones may be more
    physical = (BatchMemoryManager(data_loader=loader, optimizer=optimizer,
                                   max_physical_batch_size=cfg.max_physical_batch)
                if method.private and cfg.max_physical_batch else contextlib.nullcontext(loader))
    total, count, step, new_step = 0.0, 0, 0, True
    with physical as batches:
        for x, y in tqdm(batches, desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False,
                         disable=not progress):
            if new_step:
                method.before_step(epoch, step, steps_per_epoch)
            if cfg.augment:
                x, y = _augmented(x, y, cfg.aug_multiplicity, aug_generator)
            device = model_device(model)
            x, y = place_images(x, device), y.to(device, non_blocking=True)
            optimizer.zero_grad(set_to_none=True)
            if len(x) == 0 and method.private:
                # An empty Poisson batch must still take its (noise-only) step for the
                # accounting to hold; functorch cannot backpropagate a batch of 0, so
                # its (empty) per-sample gradients are given directly.
                for p in optimizer.params:
                    p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)
                losses = torch.zeros(0)
            else:
                losses = per_sample_loss(model(x), y, cfg.dice_weight, cfg.fluid_weight)
                (losses.sum() / max(len(losses), 1)).backward()
            optimizer.step()
            new_step = not getattr(optimizer, "_is_last_step_skipped", False)
            if new_step:
                step += 1
                after_step()
            total += float(losses.detach().sum())
            count += len(losses)
    return total / max(count, 1), step


def train(cfg: RunConfig, runs_dir: Path | str | None = None, progress: bool = True,
          log=print, keep_completed: bool = False) -> Path:
    """Train one run into the store and return its directory.

    ``keep_completed``: refuse (StoreError) rather than re-train a run found completed
    once its lock is held — what a sweep wants when another process may have finished it.
    """
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    device = resolve_device(cfg.device)
    bundle = load_data(cfg.data, cfg.limit)
    if "train" not in bundle.splits:
        raise DataError(f"{bundle.spec}: no train split; training needs train/images and "
                        f"train/masks")
    train_samples, held_out = split_holdout(bundle.splits["train"], cfg.audit_holdout)
    val_samples = bundle.splits.get("val", [])
    # statistics of the real split only: canaries do not move the normalisation
    norm_stats, norm_record = _normalisation(cfg, train_samples)
    canaries = (CanaryImages.for_run(cfg.audit_canary_images, random_seed(cfg, 5),
                                     cfg.image_size) if cfg.audit_canary_images else None)
    if canaries is not None:    # training units like any B-scan: in N, q and the accountant
        train_samples = train_samples + canaries.members
    _check_against_data(cfg, len(train_samples))
    log(f"data: {bundle.describe()}; device: {describe(device)['device']}")
    if canaries is not None:
        log(f"input-space audit: {len(canaries.members)} of {cfg.audit_canary_images} canary "
            f"B-scans drawn into training (N = {len(train_samples)})")

    train_ds = SegmentationDataset(train_samples, cfg.image_size, norm_stats)
    val_ds = SegmentationDataset(val_samples, cfg.image_size, norm_stats)
    loader = DataLoader(train_ds, batch_size=cfg.batch_size, shuffle=True,
                        generator=torch.Generator().manual_seed(random_seed(cfg, 0)))

    store = RunStore(runs_dir)
    if cfg.init_from:
        _check_init_source(cfg, store)
    model = starting_model(store, cfg)
    if cfg.trainable == "adapters":
        add_adapters(model, cfg.adapter_rank)
    model = place_model(model, device)
    set_trainable(model, cfg.trainable)
    start = copy.deepcopy(model) if canaries is not None else None   # input-space audit
    average = WeightAverage(model, cfg.ema_decay) if cfg.ema_decay else None
    method = build_method(cfg)
    model, optimizer, loader = method.attach(model, _optimizer(cfg, model), loader)
    total_steps = cfg.epochs * len(loader)
    scheduler = (torch.optim.lr_scheduler.CosineAnnealingLR(
        getattr(optimizer, "original_optimizer", optimizer), T_max=total_steps)
        if cfg.lr_schedule == "cosine" else None)
    released = average.model if average else model   # what is evaluated and saved

    def after_step():
        if scheduler is not None:
            scheduler.step()
        if average is not None:
            average.update(unwrap(model))

    writer = RunWriter(store, cfg.run_id(), {
        "config": cfg.to_dict(),
        "data": {"spec": bundle.spec, "kind": bundle.kind, "root": bundle.root,
                 "fingerprint": bundle.fingerprint, "description": bundle.describe(),
                 "n_train": len(train_samples), "n_val": len(val_samples),
                 "n_audit_holdout": len(held_out),
                 "n_canary_images": len(canaries.members) if canaries is not None else 0},
        "normalisation": norm_record, "randomness": cfg.randomness,
        "private": method.private, "sample_rate": method.sample_rate,
        "accountant_sample_rate": getattr(method, "accountant_sample_rate", None),
        "privacy_unit": cfg.privacy_unit if method.private else None, "n_units": method.n_units,
        "noise_multiplier": method.noise_multiplier,
        "diagnostics_not_covered_by_epsilon": list(DIAGNOSTIC_FIELDS) if method.private else [],
        "delta": cfg.delta if method.private else None, "accountant": cfg.accountant,
        "lr": cfg.effective_lr, "n_params": count_parameters(model),
        **describe(device),
        "steps": 0, "epsilon": 0.0 if method.private else None, "epochs_done": 0,
        "versions": package_versions()}, keep_completed=keep_completed)
    unit = "subject" if cfg.privacy_unit == "subject" else "B-scan"
    if method.private:
        log(f"noise multiplier σ={method.noise_multiplier:.4g}, sample rate "
            f"q={method.sample_rate:.4g}, δ={cfg.delta:g}; (ε, δ) is {unit}-level: it "
            f"protects one {unit} of the training split")
    per_subject = _scans_per_subject(train_ds.names)
    steps, aug_generator = 0, torch.Generator().manual_seed(random_seed(cfg, 3))
    try:
        with _cancel_on_signals():
            for epoch in tqdm(range(cfg.epochs), desc=cfg.run_id(), disable=not progress):
                t0 = time.perf_counter()
                train_loss, epoch_steps = _train_epoch(model, optimizer, loader, method,
                                                       after_step, epoch, cfg, progress,
                                                       aug_generator)
                steps += epoch_steps
                if not math.isfinite(train_loss):
                    raise Diverged(f"training diverged in epoch {epoch + 1}: the training loss "
                                   f"is {train_loss} (learning rate {cfg.effective_lr:g} too "
                                   f"large?)")
                stats = method.epoch_stats()
                seconds = time.perf_counter() - t0
                metrics, native = (evaluate(released, val_ds, cfg.dice_weight, tta=cfg.tta)
                                   if len(val_ds) else ({}, []))
                row = {"epoch": epoch + 1, "train_loss": train_loss, **metrics,
                       "epsilon": stats["epsilon"], "steps": stats["steps"] or steps,
                       "grad_norm_median": stats["grad_norm_median"],
                       "clipped_fraction": stats["clipped_fraction"],
                       "sparsity": stats["sparsity"],
                       "lr": optimizer.param_groups[0]["lr"],
                       "epoch_seconds": seconds}
                writer.append_history(row)
                writer.update(epochs_done=epoch + 1, steps=row["steps"],
                              **_privacy_record(cfg, row["epsilon"], per_subject))
                if progress:
                    tqdm.write(_summary(row, unit))
            if (audit := method.canary_audit()) is not None:
                writer.update(one_run_audit=audit)
            if canaries is not None:
                writer.update(one_run_audit_input=canary_image_audit(start, released, canaries,
                                                                     cfg, norm_stats))
            writer.save_checkpoint({k: v.detach().to("cpu", memory_format=torch.contiguous_format)
                                    for k, v in merged_state_dict(unwrap(released)).items()})
            if len(val_ds):  # the last epoch's predictions are the final model's
                writer.save_predictions("val", val_ds.names, val_ds.native_images,
                                        val_ds.native_masks, native)
                subjects = [_subject_or_none(n) for n in val_ds.names]
                if None not in subjects and len(set(subjects)) < len(subjects):
                    writer.update(val_dice_fg_by_subject=dice_by_group(
                        native, val_ds.native_masks, subjects))
            writer.finish("completed")
    except (Cancelled, KeyboardInterrupt) as exc:
        writer.finish("cancelled", f"cancelled by {exc or 'SIGINT'} after "
                                   f"{len(writer.rows)} epoch(s)")
        raise Cancelled(str(exc) or "SIGINT") from None
    except BaseException as exc:
        writer.finish("failed", f"{type(exc).__name__}: {exc}")
        raise
    return writer.dir


def _subject_or_none(name: str) -> str | None:
    try:
        return unit_of(name)
    except DataError:
        return None


def _scans_per_subject(names: list[str]) -> int | None:
    """The most B-scans one training subject contributes (None: names do not tell)."""
    if any(_subject_or_none(n) is None for n in names):
        return None
    return max((len(g) for g in group_by_unit(names)), default=1)


def _privacy_record(cfg: RunConfig, eps: float, per_subject: int | None) -> dict:
    """ε so far, and what it implies for one patient: the same ε for a subject-level run;
    for a B-scan-level run group privacy over the most B-scans any training subject has
    (δ = 1 means the bound says nothing about a whole patient)."""
    if math.isnan(eps):
        return {"epsilon": None}
    k = 1 if cfg.privacy_unit == "subject" else per_subject
    if k is None:
        return {"epsilon": eps, "scans_per_subject": None}
    subject_eps, subject_delta = group_privacy(eps, cfg.delta, k)
    return {"epsilon": eps, "scans_per_subject": per_subject, "subject_epsilon": subject_eps,
            "subject_delta": subject_delta}


def _summary(row: dict, unit: str) -> str:
    parts = [f"epoch {row['epoch']}", f"loss {row['train_loss']:.4f}"]
    if "val_dice_fg_mean" in row:
        parts.append(f"val Dice(fg) {row['val_dice_fg_mean']:.4f}")
    if not math.isnan(row["epsilon"]):
        parts.append(f"ε({unit}) {row['epsilon']:.3g}")
    return "  ".join(parts)
