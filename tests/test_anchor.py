"""The ε = 0 anchor: a pretraining checkpoint scored on its fine-tuned runs' data."""

import json

import pandas as pd
import pytest

from dpstudy import plots
from dpstudy.anchor import epsilon_zero_anchors
from dpstudy.config import RunConfig
from dpstudy.evaluate import evaluate_run
from dpstudy.store import RunStore
from dpstudy.train import train

from _runs import TINY, make_duke, quiet


@pytest.mark.slow
def test_the_anchor_is_the_pretraining_scored_on_the_private_runs_validation_data(tmp_path):
    duke = make_duke(tmp_path / "duke", n_train=4, n_val=2)
    pre = RunConfig(**{**TINY, "epochs": 2})                       # public phantom
    train(pre, tmp_path / "runs", progress=False, log=quiet)
    private = RunConfig(**{**TINY, "data": str(duke)}, method="dp_sgd", noise_multiplier=1.0,
                        init_from=pre.run_id())
    train(private, tmp_path / "runs", progress=False, log=quiet)
    store = RunStore(tmp_path / "runs")
    anchors = epsilon_zero_anchors(store, store.list_runs())
    assert list(anchors["init_from"]) == [pre.run_id()]          # the private run's start
    expected = evaluate_run(tmp_path / "runs", pre.run_id(), data=str(duke), split="val",
                            limit=TINY["limit"])["dice_fg_mean"]
    assert anchors["val_dice_fg_mean"].iloc[0] == pytest.approx(expected)
    drawn = json.dumps(plots.frontier_chart(store.list_runs(), anchors=anchors).to_dict())
    assert f"U-Net pretraining alone {expected:.3f}" in drawn
    assert "pretraining alone" not in json.dumps(plots.frontier_chart(store.list_runs()).to_dict())


def test_no_pretrained_private_run_no_anchor(tmp_path):
    runs = pd.DataFrame([{"run_id": "a", "method": "dp_sgd", "init_from": None,
                          "data": "synthetic", "model": "unet", "limit": None}])
    assert epsilon_zero_anchors(RunStore(tmp_path), runs).empty
    assert epsilon_zero_anchors(RunStore(tmp_path), runs.assign(init_from="gone")).empty


def test_anchor_labels_name_the_architecture_and_never_print_over_each_other():
    anchors = pd.DataFrame({"model": ["unet", "unet", "nested_unet"], "base_width": [16, 32, 16],
                            "depth": [4, 4, 4], "val_dice_fg_mean": [0.720, 0.723, 0.650]})
    labels = plots._anchor_labels(anchors.assign(name=plots._anchor_names(anchors)),
                                  "val_dice_fg_mean")
    # the two U-Nets (0.003 apart) share one label at the higher rule, each named by its size;
    # the Nested U-Net, the only one of its model, is named by the model alone
    assert list(labels["val_dice_fg_mean"]) == [0.723, 0.650]
    assert labels["label"].iloc[0] == ("ε = 0: U-Net width 32, depth 4 pretraining alone 0.723, "
                                       "U-Net width 16, depth 4 pretraining alone 0.720")
    assert labels["label"].iloc[1] == "ε = 0: Nested U-Net pretraining alone 0.650"
    far = anchors.assign(val_dice_fg_mean=[0.70, 0.72, 0.65])       # 0.02 apart: a label each
    assert len(plots._anchor_labels(far.assign(name=plots._anchor_names(far)),
                                    "val_dice_fg_mean")) == 3
    drawn = json.dumps(plots.frontier_chart(pd.DataFrame(), anchors=anchors).to_dict())
    assert "U-Net width 16, depth 4 pretraining alone 0.720" in drawn
    # the same architecture pretrained at two image sizes: named by the size
    sized = anchors.assign(base_width=16, image_size=["128x128", "256x128", "128x128"])
    assert plots._anchor_names(sized) == ["U-Net at 128x128", "U-Net at 256x128", "Nested U-Net"]
