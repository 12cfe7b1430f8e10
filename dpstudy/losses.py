"""Segmentation loss for DP training: cross-entropy + soft Dice, per sample.

DP-SGD clips each sample's gradient, which is only meaningful if a sample's gradient
does not depend on the other samples in the batch. The loss is therefore a mean of
independent per-sample losses; in particular the soft Dice is computed per image, never
pooled over the batch (a batch-pooled Dice would couple the samples and invalidate
per-sample clipping and the privacy accounting built on it).
"""

import torch
import torch.nn.functional as F
from torch import nn

from dpstudy.errors import ConfigError

#: Guards 0/0 only (a class with no target pixels and underflowed predicted mass);
#: such a class is never scored, so eps never turns an absent class into a Dice of 1.
EPS = 1e-7
REDUCTIONS = ("mean", "sum", "none")


def _check_dice_weight(dice_weight: float) -> None:
    if isinstance(dice_weight, bool) or not isinstance(dice_weight, (int, float)) or not dice_weight >= 0:
        raise ConfigError(f"loss dice_weight {dice_weight!r} is invalid: use a number >= 0")


def per_sample_loss(logits: torch.Tensor, target: torch.Tensor, dice_weight: float = 1.0,
                    fluid_weight: float = 1.0) -> torch.Tensor:
    """Loss of each sample, ``[B]``: pixel-mean cross-entropy + ``dice_weight``·(1 − soft Dice).

    ``fluid_weight`` multiplies the cross-entropy of fluid pixels (the last class): fluid
    covers ~1 % of a B-scan, so unweighted it barely moves the pixel mean. The weight is
    applied within each image, so samples stay independent.

    ``logits`` ``[B, C, H, W]`` are raw network outputs; the single softmax here feeds
    both terms. Soft Dice of class ``c`` in one image is ``2·Σp_c·t_c / (Σp_c + Σt_c)``
    and is averaged over the foreground classes (1…C−1) *scored* in that image: those
    present in its target or in its arg-max prediction, the same classes the Dice metric
    scores (:func:`dpstudy.metrics.dice_per_class`). So

    * a class in neither is skipped, as the metric leaves it undefined (NaN) — no
      smoothing constant awards it a Dice of 1;
    * a class predicted but absent from the target has soft Dice exactly 0 and adds 1 to
      the term, as it costs the metric. Dice is scale-free in the predicted mass, so this
      term has no gradient; the cross-entropy is what pushes that mass down;
    * an image scoring no foreground class has Dice term 0.

    Sums run in at least float32: over ~10^5 pixels they overflow float16.
    """
    if logits.ndim != 4 or target.shape != (logits.shape[0], *logits.shape[2:]):
        raise ValueError(
            f"logits must be [B, C, H, W] and target [B, H, W]; got logits {tuple(logits.shape)} "
            f"and target {tuple(target.shape)}"
        )
    if target.dtype != torch.long:
        raise ValueError(f"target must be int64 class indices; got {target.dtype}")
    _check_dice_weight(dice_weight)
    batch, n_classes = logits.shape[:2]
    log_p = F.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=1)
    weight = None
    if fluid_weight != 1.0:
        weight = torch.ones(n_classes, dtype=log_p.dtype, device=log_p.device)
        weight[-1] = fluid_weight
    cross_entropy = F.nll_loss(log_p, target, weight=weight, reduction="none").mean(dim=(1, 2))

    p = log_p.exp()[:, 1:]
    onehot = F.one_hot(target, n_classes).permute(0, 3, 1, 2)[:, 1:].to(p.dtype)
    intersection = (p * onehot).sum(dim=(2, 3))
    target_size = onehot.sum(dim=(2, 3))
    dice = 2 * intersection / (p.sum(dim=(2, 3)) + target_size).clamp_min(EPS)

    # Classes hit by the arg-max in each image, via one bincount over (sample, class).
    offsets = torch.arange(batch, device=logits.device).view(batch, 1, 1) * n_classes
    hits = (logits.argmax(dim=1) + offsets).flatten().bincount(minlength=batch * n_classes)
    predicted = hits.view(batch, n_classes)[:, 1:] > 0
    scored = (target_size > 0) | predicted
    n_scored = scored.sum(dim=1)
    dice_term = torch.where(scored, 1 - dice, 0).sum(dim=1) / n_scored.clamp_min(1)
    return cross_entropy + dice_weight * dice_term


class SegmentationLoss(nn.Module):
    """``per_sample_loss`` reduced over the batch (mean by default).

    The ``reduction`` attribute follows the ``nn.CrossEntropyLoss`` convention that
    Opacus's ghost clipping relies on: it sets ``reduction = "none"`` to obtain the
    per-sample losses.
    """

    def __init__(self, dice_weight: float = 1.0, reduction: str = "mean"):
        super().__init__()
        _check_dice_weight(dice_weight)
        if reduction not in REDUCTIONS:
            raise ConfigError(f"loss reduction {reduction!r} is invalid: use one of {', '.join(REDUCTIONS)}")
        self.dice_weight = dice_weight
        self.reduction = reduction

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        losses = per_sample_loss(logits, target, self.dice_weight)
        if self.reduction == "mean":
            return losses.mean()
        if self.reduction == "sum":
            return losses.sum()
        return losses
