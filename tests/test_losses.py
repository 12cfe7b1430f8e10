"""Per-sample independence and correctness of the segmentation loss."""

import pytest
import torch
import torch.nn.functional as F

from dpstudy.errors import ConfigError
from dpstudy.losses import SegmentationLoss, per_sample_loss

C = 9


def _batch(seed: int, batch: int = 3, size: int = 8):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, C, size, size, generator=g), torch.randint(0, C, (batch, size, size), generator=g)


def test_sample_loss_unchanged_when_others_change():
    logits, target = _batch(0)
    other_logits, other_target = _batch(1)
    other_logits[0], other_target[0] = logits[0], target[0]
    torch.testing.assert_close(per_sample_loss(logits, target)[0], per_sample_loss(other_logits, other_target)[0])


def test_gradient_of_sample_independent_of_others():
    logits, target = _batch(0)
    logits.requires_grad_(True)
    SegmentationLoss()(logits, target).backward()
    alone = logits[:1].detach().clone().requires_grad_(True)
    per_sample_loss(alone, target[:1]).sum().backward()
    # mean over a batch of 3 scales each sample's gradient by 1/3 and nothing else
    torch.testing.assert_close(logits.grad[:1] * 3, alone.grad)

    logits.grad = None
    per_sample_loss(logits, target)[0].backward()
    assert logits.grad[1:].abs().max() == 0


def test_perfect_prediction_has_near_zero_dice_term():
    _, target = _batch(2)
    target[:, 0, :3] = 5  # a class present in only part of the images is fine too
    logits = 50.0 * F.one_hot(target, C).permute(0, 3, 1, 2).float()
    dice_term = per_sample_loss(logits, target) - per_sample_loss(logits, target, dice_weight=0.0)
    assert dice_term.abs().max() < 1e-5


def _manual_loss(logits, target, dice_weight):
    """Reference: one softmax, then the documented CE and per-image Dice over scored classes."""
    losses = []
    for x, t in zip(logits, target):
        p = torch.softmax(x, dim=0)
        ce = -torch.log(p.gather(0, t[None])).mean()
        terms = []
        for c in range(1, C):
            truth = (t == c).float()
            if truth.sum() > 0 or (x.argmax(0) == c).any():
                terms.append(1 - 2 * (p[c] * truth).sum() / (p[c].sum() + truth.sum()))
        dice = torch.stack(terms).mean() if terms else torch.tensor(0.0)
        losses.append(ce + dice_weight * dice)
    return torch.stack(losses)


def test_matches_manual_computation_with_single_softmax():
    logits, target = _batch(3)
    target[1] = torch.where(target[1] > 4, 0, target[1])  # some classes absent from a target
    torch.testing.assert_close(per_sample_loss(logits, target, 0.7), _manual_loss(logits, target, 0.7))


def test_background_only_sample_is_finite():
    target = torch.zeros(2, 8, 8, dtype=torch.long)
    logits = torch.zeros(2, C, 8, 8)
    logits[:, 0] = 30.0  # confidently background everywhere: no class scored
    logits[1, 4, 2, 2] = 60.0  # one false-positive pixel of class 4
    logits.requires_grad_(True)
    loss = per_sample_loss(logits, target)
    loss.sum().backward()
    assert torch.isfinite(loss).all() and torch.isfinite(logits.grad).all()
    ce = per_sample_loss(logits, target, dice_weight=0.0)
    assert (loss - ce)[0].item() == 0  # nothing scored, no Dice term
    assert (loss - ce)[1].item() == pytest.approx(1.0)  # the predicted-but-absent class scores Dice 0


def test_reduction_and_validation():
    logits, target = _batch(4)
    per_sample = per_sample_loss(logits, target)
    torch.testing.assert_close(SegmentationLoss(reduction="none")(logits, target), per_sample)
    torch.testing.assert_close(SegmentationLoss(reduction="sum")(logits, target), per_sample.sum())
    with pytest.raises(ConfigError, match="dice_weight"):
        SegmentationLoss(dice_weight=-1)
    with pytest.raises(ConfigError, match="reduction 'avg' is invalid: use one of mean, sum, none"):
        SegmentationLoss(reduction="avg")
    for bad in (True, "1", float("nan")):
        with pytest.raises(ConfigError, match="dice_weight"):
            per_sample_loss(logits, target, bad)
    with pytest.raises(ValueError, match="target"):
        per_sample_loss(logits, target[:, :4])
    with pytest.raises(ValueError, match="int64"):
        per_sample_loss(logits, target.int())


def test_the_module_applies_its_own_dice_weight():
    logits, target = _batch(5)
    torch.testing.assert_close(SegmentationLoss(dice_weight=0.25)(logits, target),
                               per_sample_loss(logits, target, 0.25).mean())


def test_a_class_on_a_single_target_pixel_is_scored():
    """Present in the target on one pixel, predicted nowhere: its Dice term is 1 − 2p/(Σp+1)."""
    target = torch.zeros(1, 4, 4, dtype=torch.long)
    target[0, 1, 1] = 3
    logits = torch.zeros(1, C, 4, 4)
    logits[:, 0] = 5.0
    torch.testing.assert_close(per_sample_loss(logits, target), _manual_loss(logits, target, 1.0))
    dice_term = per_sample_loss(logits, target) - per_sample_loss(logits, target, 0.0)
    p = torch.softmax(logits[0], 0)[3]
    torch.testing.assert_close(dice_term[0], 1 - 2 * p[1, 1] / (p.sum() + 1))


def test_half_precision_logits_are_summed_in_float32():
    logits, target = _batch(6, size=64)
    half = per_sample_loss(logits.half(), target)
    assert half.dtype == torch.float32
    torch.testing.assert_close(half, per_sample_loss(logits.half().float(), target))
