"""Metrics on hand-made 4×4 masks with hand-computed values."""

import math
import warnings

import numpy as np
import pytest

from dpstudy.classes import CLASS_SLUGS
from dpstudy.metrics import confusion_matrix, dice_per_class, per_image_dice, segmentation_metrics, dice_by_group

# Image 1: background, NFL, GCL-IPL, INL and fluid in the target; INL and fluid missed.
T1 = np.array([[0, 0, 0, 0], [1, 1, 1, 1], [2, 2, 3, 3], [8, 8, 0, 0]])
P1 = np.array([[0, 0, 0, 0], [1, 1, 1, 0], [2, 2, 2, 2], [0, 0, 0, 0]])
# Image 2: NFL perfect; INL predicted on one pixel but absent from the target.
T2 = np.array([[0, 0, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0], [0, 0, 0, 0]])
P2 = np.array([[0, 0, 0, 0], [1, 1, 1, 1], [0, 0, 3, 0], [0, 0, 0, 0]])

NAN = math.nan
# |P∩T|, |P|, |T| counted by hand: background 6, 9, 6; NFL 3, 3, 4; GCL-IPL 2, 4, 2.
DICE1 = [12 / 15, 6 / 7, 4 / 6, 0.0, NAN, NAN, NAN, NAN, 0.0]
DICE2 = [22 / 23, 1.0, NAN, 0.0, NAN, NAN, NAN, NAN, NAN]


def test_confusion_matrix_rows_are_target():
    cm = confusion_matrix(P1, T1)
    assert cm.shape == (9, 9) and cm.dtype == np.int64
    assert cm.sum() == 16
    assert cm[1, 0] == 1  # one NFL pixel predicted as background
    assert cm[3, 2] == 2  # both INL pixels predicted as GCL-IPL
    assert cm[8, 0] == 2
    assert np.trace(cm) == 11


def test_dice_per_class_hand_values():
    np.testing.assert_allclose(dice_per_class(P1, T1), DICE1, equal_nan=True)
    np.testing.assert_allclose(dice_per_class(P2, T2), DICE2, equal_nan=True)


def test_dice_perfect_prediction_is_one_and_absent_class_nan():
    dice = dice_per_class(T1, T1)
    np.testing.assert_array_equal(dice[[0, 1, 2, 3, 8]], 1.0)
    assert np.isnan(dice[[4, 5, 6, 7]]).all()


def test_dice_target_only_and_prediction_only_score_zero():
    target = np.zeros((4, 4), dtype=np.uint8)
    target[0, 0] = 8
    pred = np.zeros((4, 4), dtype=np.uint8)
    pred[3, 3] = 5
    dice = dice_per_class(pred, target)
    assert dice[8] == 0.0  # in target, not predicted
    assert dice[5] == 0.0  # predicted, not in target
    assert np.isnan(dice[1])


def test_segmentation_metrics_means_as_documented():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # undefined classes must not warn
        m = segmentation_metrics([P1, P2], [T1, T2])
    expected_class = {
        "background": (12 / 15 + 22 / 23) / 2,
        "nfl": (6 / 7 + 1.0) / 2,
        "gcl_ipl": 4 / 6,  # undefined in image 2, so image 1 only
        "inl": 0.0,
        "fluid": 0.0,
    }
    for slug in CLASS_SLUGS:
        if slug in expected_class:
            assert m[f"dice_{slug}"] == pytest.approx(expected_class[slug])
        else:
            assert math.isnan(m[f"dice_{slug}"])
    fg = [v for k, v in expected_class.items() if k != "background"]
    assert m["dice_fg_mean"] == pytest.approx(sum(fg) / 4)
    assert m["dice_all_mean"] == pytest.approx(sum(expected_class.values()) / 5)
    assert m["pixel_accuracy"] == pytest.approx((11 + 15) / 32)
    assert set(m) == {f"dice_{s}" for s in CLASS_SLUGS} | {"dice_fg_mean", "dice_all_mean", "pixel_accuracy"}


def test_per_image_dice_stacks_images():
    np.testing.assert_allclose(per_image_dice([P1, P2], [T1, T2]), [DICE1, DICE2], equal_nan=True)


def test_shape_mismatch_names_both_shapes():
    with pytest.raises(ValueError, match=r"\(4, 4\).*\(4, 3\)"):
        dice_per_class(P1, T1[:, :3])
    with pytest.raises(ValueError, match="equally many"):
        segmentation_metrics([P1], [T1, T2])


def test_labels_out_of_range_or_non_integer_rejected():
    with pytest.raises(ValueError, match="0..8"):
        confusion_matrix(P1 + 7, T1)
    with pytest.raises(ValueError, match="integers"):
        confusion_matrix(P1.astype(float), T1)


def test_dice_by_group_scores_each_patient_on_its_own_images():
    t = np.zeros((4, 4), np.uint8)
    t[:2] = 1
    perfect, wrong = t.copy(), np.zeros_like(t)
    wrong[2:] = 1                                     # predicts class 1 where it is absent
    out = dice_by_group([perfect, perfect, wrong], [t, t, t], ["S_07", "S_07", "S_08"])
    assert out == {"S_07": 1.0, "S_08": 0.0}
