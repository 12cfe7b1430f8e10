"""Scoring a stored run against values known without the code under test.

A checkpoint whose network predicts one class everywhere (output layer: weights 0, a
bias on that class) has Dice scores and a pixel accuracy that follow from the masks
alone, at native resolution: per image, the predicted class scores 2·|T_c|/(N + |T_c|),
every other class in the mask scores 0, and a class in neither is not scored.
"""

import json

import numpy as np
import pytest
import torch

from _runs import make_duke, write_run
from dpstudy.classes import CLASS_SLUGS
from dpstudy.cli import main as cli_main
from dpstudy.data.source import load_data
from dpstudy.evaluate import evaluate_run


def _constant_run(root, run_id: str, cls: int) -> str:
    """A completed run on a small Duke folder (``root/duke``) whose checkpoint predicts
    ``cls`` everywhere."""
    data = str(make_duke(root / "duke", n_val=3))
    run_dir = write_run(root / "runs", run_id, checkpoint=True,
                        data={"kind": "duke", "spec": data, "fingerprint": "0" * 16})
    state = torch.load(run_dir / "model.pt", weights_only=True)
    state["head.weight"].zero_()
    state["head.bias"].copy_(torch.eye(len(CLASS_SLUGS))[cls] * 10)
    torch.save(state, run_dir / "model.pt")
    return run_id


def _expected(masks: list[np.ndarray], cls: int) -> dict[str, float]:
    """Per-class Dice (mean over the images that score the class), their means, accuracy."""
    per_class = {}
    for c, slug in enumerate(CLASS_SLUGS):
        scores = [(2 * (m == c).sum() / (m.size + (m == c).sum()) if c == cls else 0.0)
                  for m in masks if c == cls or (m == c).any()]
        per_class[f"dice_{slug}"] = float(np.mean(scores)) if scores else float("nan")
    scored = [v for v in per_class.values() if not np.isnan(v)]
    fg = [v for k, v in per_class.items() if k != "dice_background" and not np.isnan(v)]
    return {**per_class, "dice_all_mean": float(np.mean(scored)), "dice_fg_mean": float(np.mean(fg)),
            "pixel_accuracy": float(sum((m == cls).sum() for m in masks) / sum(m.size for m in masks))}


@pytest.mark.parametrize("cls", [0, 1])     # background, then NFL, everywhere
def test_a_constant_prediction_scores_what_the_masks_say(tmp_path, cls):
    run_id = _constant_run(tmp_path, "constant", cls)
    masks = [s.mask for s in load_data(str(tmp_path / "duke")).splits["val"]]
    expected = _expected(masks, cls)
    assert 0 < expected["pixel_accuracy"] < 1 and expected["dice_fg_mean"] < 0.5
    got = evaluate_run(tmp_path / "runs", run_id, split="val")
    assert got["n_images"] == len(masks) == 3
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, rel=1e-9, nan_ok=True), key


def test_cli_evaluate_prints_the_same_known_values(tmp_path, capsys):
    run_id = _constant_run(tmp_path, "constant", 0)
    expected = _expected([s.mask for s in load_data(str(tmp_path / "duke")).splits["val"]], 0)
    capsys.readouterr()
    assert cli_main(["evaluate", run_id, "--json", "--runs-dir", str(tmp_path / "runs")]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["split"] == "val"
    for key, value in expected.items():
        assert printed[key] == pytest.approx(value, rel=1e-9, nan_ok=True), key
