"""Prediction and evaluation of a model on one split.

Published metrics are computed at the native resolution of each mask: the logits are
resized back bilinearly and the argmax taken there, so no label is ever interpolated.
Metrics at the working resolution are kept as well, to show what resizing costs.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from .config import RunConfig
from .data.dataset import SegmentationDataset
from .data.source import load_data
from .data.transforms import logits_to_native
from .device import model_device, place_images, place_model, resolve_device
from .errors import DataError
from .losses import per_sample_loss
from .metrics import segmentation_metrics
from .models import build_model
from .store import RunStore, load_weights


def unwrap(model: nn.Module) -> nn.Module:
    """The plain network inside an Opacus ``GradSampleModule`` (or the model itself)."""
    return getattr(model, "_module", model)


def tta_logits(net: nn.Module, x: torch.Tensor, tta: str = "none") -> torch.Tensor:
    """The logits a run predicts with: the network's, or with ``tta="flip"`` their mean
    with those of the left-right mirrored B-scan (mirrored back). A B-scan's anatomy is
    plausible both ways round, so the mirror is a second opinion from the same released
    weights: post-processing, free in privacy."""
    logits = net(x)
    if tta == "flip":
        logits = (logits + net(x.flip(-1)).flip(-1)) / 2
    return logits


@torch.no_grad()
def predict(model: nn.Module, dataset: SegmentationDataset, dice_weight: float = 1.0,
            batch_size: int = 8, tta: str = "none"):
    """Loss, native-resolution predictions and working-resolution predictions."""
    net = unwrap(model)
    was_training = net.training
    net.eval()
    device = model_device(net)
    losses, native, work = [], [], []
    for start in range(0, len(dataset), batch_size):
        idx = range(start, min(start + batch_size, len(dataset)))
        logits = tta_logits(net, place_images(dataset.x[idx.start:idx.stop], device), tta).cpu()
        y = dataset.y[idx.start:idx.stop]
        losses.append(per_sample_loss(logits, y, dice_weight))
        work.extend(logits.argmax(1).to(torch.uint8).numpy())
        for j, i in enumerate(idx):
            size = dataset.native_masks[i].shape
            native.append(logits_to_native(logits[j], size).argmax(0).to(torch.uint8).numpy())
    net.train(was_training)
    loss = float(torch.cat(losses).mean()) if losses else float("nan")
    return loss, native, work


def evaluate(model: nn.Module, dataset: SegmentationDataset, dice_weight: float = 1.0,
             prefix: str = "val_", tta: str = "none") -> tuple[dict[str, float], list[np.ndarray]]:
    """``{prefix}loss``, native metrics as ``{prefix}*``, working ones as ``{prefix}work_*``."""
    loss, native, work = predict(model, dataset, dice_weight, tta=tta)
    work_targets = list(dataset.y.numpy())
    metrics = {f"{prefix}loss": loss}
    metrics.update({f"{prefix}{k}": v for k, v in
                    segmentation_metrics(native, list(dataset.native_masks)).items()})
    w = segmentation_metrics(work, work_targets)
    metrics.update({f"{prefix}work_{k}": w[k]
                    for k in ("dice_fg_mean", "dice_all_mean", "pixel_accuracy")})
    return metrics, native


def starting_model(store: RunStore, cfg: RunConfig) -> nn.Module:
    """The network a run of ``cfg`` starts from: fresh (from the global torch RNG), or
    with the weights of its ``init_from`` run."""
    model = build_model(cfg.model, cfg.base_width, cfg.depth)
    if cfg.init_from:
        load_weights(store, cfg.init_from, model)
    return model


def load_trained(store: RunStore, run_id: str, meta: dict | None = None, device: str = "cpu"
                 ) -> tuple[dict, RunConfig, nn.Module]:
    """A stored run's metadata (``meta`` if already read), config and final model, ready
    to score any images: on ``device`` in the memory format training used there, so that
    on the training device a rescoring reproduces the stored predictions pixel for pixel
    (NHWC and NCHW convolutions differ in the last bits)."""
    meta = store.read_meta(run_id) if meta is None else meta
    cfg = RunConfig.from_stored(meta["config"], where=str(store.path(run_id) / "config.json"))
    model = build_model(cfg.model, cfg.base_width, cfg.depth)
    load_weights(store, run_id, model)
    return meta, cfg, place_model(model, resolve_device(device))


def stored_dataset(samples, cfg: RunConfig, meta: dict) -> SegmentationDataset:
    """Images scaled exactly as the run saw them in training: its image size and the
    normalisation it recorded (per image, or its training split's mean and std)."""
    norm = meta["normalisation"]
    stats = None if norm.get("mode") == "per_image" else (norm["mean"], norm["std"])
    return SegmentationDataset(samples, cfg.image_size, stats)


#: ``limit`` of :func:`evaluate_run` meaning "the run's own ``limit``".
RUN_LIMIT = "run"


def evaluate_run(runs_dir, run_id: str, data: str | None = None, split: str = "val",
                 limit: int | None | str = RUN_LIMIT, device: str = "auto") -> dict:
    """Metrics of a stored run's final checkpoint on any split of any data (default: the
    run's own). ``limit``: the first N images of the split, None for all, or
    :data:`RUN_LIMIT` for the run's own limit, so that by default the images scored are
    the ones the run was evaluated on. ``scored`` says which, in words."""
    meta, cfg, model = load_trained(RunStore(runs_dir), run_id, device=device)
    limit = cfg.limit if limit == RUN_LIMIT else limit
    if limit is not None and limit < 1:
        raise DataError(f"limit={limit} is invalid: use a positive number of images, or none")
    bundle = load_data(data or meta["data"]["spec"], limit)
    if split not in bundle.splits:
        raise DataError(f"{bundle.spec}: no {split!r} split (available: {sorted(bundle.splits)})")
    dataset = stored_dataset(bundle.splits[split], cfg, meta)
    metrics, _ = evaluate(model, dataset, cfg.dice_weight, prefix="", tta=cfg.tta)
    where = bundle.root or bundle.describe().partition(":")[0]
    cap = ("every image" if limit is None else f"the first {limit} images"
           + (" (the run's --limit)" if limit == cfg.limit else ""))
    return {"run_id": run_id, "data": bundle.describe(), "split": split,
            "n_images": len(dataset), "limit": limit,
            "scored": f"Scored {len(dataset)} images of run {run_id}: the {split!r} split of "
                      f"{where}, {cap}.", **metrics}
