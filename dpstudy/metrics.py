"""Segmentation metrics behind every published number (pure numpy).

Dice of a class absent from both prediction and target is undefined (NaN) and left out
of every mean, rather than scored 1 by a smoothing constant: that would reward a model
for the mere absence of, say, fluid and inflate the means in a data-dependent way.
"""

import numpy as np

from dpstudy.classes import CLASS_SLUGS, N_CLASSES


def _check_pair(pred: np.ndarray, target: np.ndarray, n_classes: int) -> None:
    if pred.shape != target.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from target shape {target.shape}")
    for name, labels in (("prediction", pred), ("target", target)):
        if not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(f"{name} labels must be integers; got dtype {labels.dtype}")
        if labels.size and (labels.min() < 0 or labels.max() >= n_classes):
            raise ValueError(
                f"{name} labels span {labels.min()}..{labels.max()}; valid labels are 0..{n_classes - 1}"
            )


def confusion_matrix(pred: np.ndarray, target: np.ndarray, n_classes: int = N_CLASSES) -> np.ndarray:
    """Pixel counts ``[C, C]`` (int64): row = target class, column = predicted class."""
    pred, target = np.asarray(pred), np.asarray(target)
    _check_pair(pred, target, n_classes)
    flat = target.astype(np.int64).ravel() * n_classes + pred.astype(np.int64).ravel()
    return np.bincount(flat, minlength=n_classes * n_classes).reshape(n_classes, n_classes)


def _dice_from_confusion(cm: np.ndarray) -> np.ndarray:
    overlap = 2 * np.diag(cm).astype(np.float64)
    sizes = (cm.sum(axis=0) + cm.sum(axis=1)).astype(np.float64)
    return np.divide(overlap, sizes, out=np.full(len(cm), np.nan), where=sizes > 0)


def dice_per_class(pred: np.ndarray, target: np.ndarray, n_classes: int = N_CLASSES) -> np.ndarray:
    """Dice ``2|P∩T| / (|P| + |T|)`` per class, length ``n_classes``.

    NaN for a class absent from both (undefined); 0 for a class predicted but absent from
    the target, or present but not predicted.
    """
    return _dice_from_confusion(confusion_matrix(pred, target, n_classes))


def _nanmean(values: np.ndarray, axis: int | None = None) -> np.ndarray | float:
    """``np.nanmean`` without its all-NaN warning: an undefined class is expected."""
    defined = ~np.isnan(values)
    count = defined.sum(axis=axis)
    total = np.where(defined, values, 0.0).sum(axis=axis)
    return np.divide(total, count, out=np.full(np.shape(total), np.nan), where=count > 0)


def _confusions(preds: list[np.ndarray], targets: list[np.ndarray], n_classes: int) -> np.ndarray:
    if len(preds) != len(targets) or not preds:
        raise ValueError(
            f"need equally many predictions and targets, at least one; got {len(preds)} and {len(targets)}"
        )
    return np.stack([confusion_matrix(p, t, n_classes) for p, t in zip(preds, targets)])


def per_image_dice(
    preds: list[np.ndarray], targets: list[np.ndarray], n_classes: int = N_CLASSES
) -> np.ndarray:
    """Dice per image and class, ``[N, C]`` (NaN where undefined), e.g. for paired tests."""
    return np.stack([_dice_from_confusion(cm) for cm in _confusions(preds, targets, n_classes)])


def segmentation_metrics(
    preds: list[np.ndarray], targets: list[np.ndarray], n_classes: int = N_CLASSES
) -> dict[str, float]:
    """Dice and pixel accuracy over a set of images.

    * ``dice_<slug>``: the class's per-image Dice averaged over the images where it is
      defined (NaN if it is undefined in every image);
    * ``dice_fg_mean``: mean of the foreground classes' ``dice_<slug>`` (NaN ones left
      out) — class-wise first, so a class's weight does not depend on how many images
      contain it;
    * ``dice_all_mean``: the same over all classes, background included (the metric the
      original study reported);
    * ``pixel_accuracy``: correct pixels / all pixels, pooled over images.

    Slugs are :data:`dpstudy.classes.CLASS_SLUGS` for the 9-class task, else class indices.
    """
    confusions = _confusions(preds, targets, n_classes)
    per_class = _nanmean(np.stack([_dice_from_confusion(cm) for cm in confusions]), axis=0)
    slugs = CLASS_SLUGS if n_classes == N_CLASSES else [str(c) for c in range(n_classes)]
    metrics = {f"dice_{slug}": float(v) for slug, v in zip(slugs, per_class)}
    metrics["dice_fg_mean"] = float(_nanmean(per_class[1:]))
    metrics["dice_all_mean"] = float(_nanmean(per_class))
    pooled = confusions.sum(axis=0)
    metrics["pixel_accuracy"] = float(np.trace(pooled) / pooled.sum())
    return metrics


def dice_by_group(preds: list[np.ndarray], targets: list[np.ndarray], groups: list[str],
                  n_classes: int = N_CLASSES) -> dict[str, float]:
    """Foreground mean Dice of each group of images (e.g. each patient), so a result can
    be read per patient rather than only pooled over patients."""
    out = {}
    for g in dict.fromkeys(groups):
        idx = [i for i, name in enumerate(groups) if name == g]
        out[g] = segmentation_metrics([preds[i] for i in idx], [targets[i] for i in idx],
                                      n_classes)["dice_fg_mean"]
    return out
