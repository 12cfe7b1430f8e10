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
from dpstudy.config import RunConfig
from dpstudy.data.dataset import SegmentationDataset
from dpstudy.data.source import load_data
from dpstudy.errors import ConfigError
from dpstudy.evaluate import (evaluate, evaluate_run, load_trained, predict, stored_dataset,
                              tta_logits)
from dpstudy.models import build_model
from dpstudy.store import RunStore


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


class _ColumnRamp(torch.nn.Module):
    """Logits that depend on the column only: NFL gets ``a·(1 − 2j/(W−1)) + b`` (a ramp
    from +a at the left edge to −a at the right), every other class 0."""

    def __init__(self, a: float, b: float):
        super().__init__()
        self.a, self.b = torch.nn.Parameter(torch.tensor(a)), b   # a parameter: it has a device

    def forward(self, x):
        n, _, h, w = x.shape
        out = torch.zeros(n, len(CLASS_SLUGS), h, w)
        out[:, 1] = self.a.detach() * (1 - 2 * torch.arange(w) / (w - 1)) + self.b
        return out


def test_flip_tta_averages_a_bscan_with_its_mirror_image():
    """Mirrored, the ramp runs the other way, so the average keeps only its offset."""
    x = torch.rand(2, 1, 6, 9)
    net = _ColumnRamp(2.0, 0.5)
    plain, flip = tta_logits(net, x), tta_logits(net, x, "flip")
    assert plain[0, 1, 0, 0] == pytest.approx(2.5) and plain[0, 1, 0, -1] == pytest.approx(-1.5)
    assert torch.allclose(flip[:, 1], torch.full((2, 6, 9), 0.5))
    assert torch.equal(flip[:, 2:], plain[:, 2:])


def test_predict_with_flip_tta_changes_the_native_masks(tmp_path):
    """NFL wins where the ramp plus offset is positive: the left part of each B-scan
    plainly, every column once the mirror is averaged in."""
    samples = load_data(str(make_duke(tmp_path / "duke", n_val=2))).splits["val"]
    data = SegmentationDataset(samples, (16, 16))
    _, plain, _ = predict(_ColumnRamp(1.0, 0.25), data)
    _, flip, _ = predict(_ColumnRamp(1.0, 0.25), data, tta="flip")
    width = plain[0].shape[1]
    assert (plain[0][:, : width // 2] == 1).all() and (plain[0][:, -3:] == 0).all()
    assert all((m == 1).all() for m in flip)


def test_a_stored_run_is_rescored_with_its_own_tta(tmp_path):
    """``evaluate_run`` predicts as the run did: with its ``tta``."""
    data = str(make_duke(tmp_path / "duke", n_val=3))
    cfg = RunConfig(data=data, image_size=(32, 32), base_width=4, depth=2, tta="flip")
    stored = {"kind": "duke", "spec": data, "fingerprint": "0" * 16}
    weights = build_model(cfg.model, cfg.base_width, cfg.depth).state_dict()
    for run_id, tta in (("plain", "none"), ("flip", "flip")):
        run_dir = write_run(tmp_path / "runs", run_id, data=stored, config=cfg.replace(
            tta=tta).to_dict(), normalisation={"mode": "per_image"})
        torch.save(weights, run_dir / "model.pt")                   # the same weights
    plain, flip = (evaluate_run(tmp_path / "runs", r) for r in ("plain", "flip"))
    assert plain["loss"] != flip["loss"]
    meta, _, model = load_trained(RunStore(tmp_path / "runs"), "flip")
    by_hand, _ = evaluate(model, stored_dataset(load_data(data).splits["val"], cfg, meta),
                          prefix="", tta="flip")
    assert flip["loss"] == pytest.approx(by_hand["loss"], rel=1e-9)
    assert flip["dice_fg_mean"] == pytest.approx(by_hand["dice_fg_mean"], rel=1e-9)


def test_an_unknown_tta_is_refused_by_name():
    with pytest.raises(ConfigError, match="tta"):
        RunConfig(tta="mirror")
