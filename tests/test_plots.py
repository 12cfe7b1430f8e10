"""Chart builders and exports: pure functions of DataFrames, checked without Streamlit."""

import io
import json
import struct

import numpy as np
import pandas as pd
import pytest

from dpstudy import plots
from dpstudy.classes import CLASS_COLOURS


@pytest.fixture
def runs() -> pd.DataFrame:
    """A run table as ``list_runs()`` gives it, broken run included."""
    return pd.DataFrame([
        dict(run_id="np", model="unet", method="non_dp", epsilon=None, noise_multiplier=None,
             val_dice_fg_mean=0.80, status="completed"),
        dict(run_id="s1", model="unet", method="dp_sgd", epsilon=8.0, noise_multiplier=1.0,
             val_dice_fg_mean=0.60, status="completed"),
        dict(run_id="s2", model="nested_unet", method="dp_sgd", epsilon=2.0,
             noise_multiplier=2.0, val_dice_fg_mean=0.50, status="completed"),
        dict(run_id="s3", model="unet", method="dp_sgd", epsilon=4.0, noise_multiplier=1.5,
             val_dice_fg_mean=0.45, status="completed"),
        dict(run_id="a2", model="unet", method="auto_clip", epsilon=2.0, noise_multiplier=2.0,
             val_dice_fg_mean=0.55, status="completed"),
        dict(run_id="bad", status="broken", error="corrupt JSON"),
    ])


@pytest.fixture
def history() -> pd.DataFrame:
    return pd.DataFrame(dict(run_id=["s1", "s1", "np", "np"],
                             method=["dp_sgd"] * 2 + ["non_dp"] * 2, model="unet", epoch=[1, 2, 1, 2], epsilon=[4.0, 8.0, None, None],
                             train_loss=[1.0, 0.5, 0.9, 0.4], val_loss=[1.1, 0.6, 1.0, 0.5]))


def test_pareto_front_keeps_only_undominated_points():
    df = pd.DataFrame({"eps": [1, 2, 3, 4, 2, np.nan], "dice": [0.5, 0.4, 0.7, 0.6, 0.7, 0.9]})
    front = plots.pareto_front(df, "eps", "dice")
    assert front[["eps", "dice"]].values.tolist() == [[1, 0.5], [2, 0.7]]


def test_pareto_front_ties_and_empty():
    df = pd.DataFrame({"x": [1.0, 1.0, 1.0], "y": [0.3, 0.5, 0.5]})
    assert plots.pareto_front(df, "x", "y")["y"].tolist() == [0.5]
    assert plots.pareto_front(df.iloc[0:0], "x", "y").empty


def test_frontier_chart_draws_dp_points_fronts_and_non_private_rule(runs):
    chart = plots.frontier_chart(runs)
    data = chart.data.set_index("run_id")
    assert set(data.index) == {"np", "s1", "s2", "s3", "a2"}  # broken run left out
    assert data["on_front"].to_dict() == {"np": False, "s1": True, "s2": True, "s3": False,
                                          "a2": True}
    spec = chart.to_dict()
    assert spec["layer"][0]["mark"]["type"] == "rule"
    assert spec["layer"][2]["encoding"]["x"]["scale"] == {"type": "log"}
    assert {"shape", "color", "tooltip"} <= set(spec["layer"][2]["encoding"])


def test_frontier_chart_other_metric_and_only_broken_runs(runs):
    runs["val_dice_inl"] = [0.7, 0.2, 0.3, np.nan, 0.1, None]
    inl = plots.frontier_chart(runs, "val_dice_inl")
    assert set(inl.data["run_id"]) == {"np", "s1", "s2", "a2"}
    empty = plots.frontier_chart(runs[runs["status"] == "broken"][["run_id", "status", "error"]])
    assert empty.data.empty
    assert plots.chart_to_png(empty).startswith(b"\x89PNG")


def test_noise_chart_excludes_non_private(runs):
    assert set(plots.noise_chart(runs).data["run_id"]) == {"s1", "s2", "s3", "a2"}


def test_curves_chart_stacks_series(history):
    chart = plots.curves_chart(history, plots.CURVES["loss"], "loss")
    assert len(chart.data) == 8 and set(chart.data["series"]) == {"train_loss", "val_loss"}
    assert "strokeDash" in chart.to_dict()["layer"][0]["encoding"]
    eps = plots.epsilon_epochs_chart(history)
    assert eps.data["run_id"].unique().tolist() == ["s1"]  # non-private: no ε
    assert plots.curves_chart(history, ["clipped_fraction"], "clipped").data.empty


def test_exports_are_valid_files(runs, history):
    png = plots.chart_to_png(plots.frontier_chart(runs))
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", png[16:24])
    assert width > 300 and height > 200
    assert plots.chart_to_svg(plots.frontier_chart(runs)).lstrip().startswith("<svg")
    csv = pd.read_csv(io.BytesIO(plots.chart_to_csv(plots.noise_chart(runs))))
    assert set(csv["run_id"]) == {"s1", "s2", "s3", "a2"}
    figure = plots.comparison_chart(
        [plots.frontier_chart(runs), plots.curves_chart(history, ["train_loss"], "loss")], "t")
    assert plots.chart_to_pdf(figure).startswith(b"%PDF")
    with pytest.raises(ValueError, match="no top-level DataFrame"):
        plots.chart_to_csv(figure)


def test_specs_load_nothing_from_outside(runs):
    spec = json.loads(plots.frontier_chart(runs).to_json())
    assert "url" not in json.dumps(spec.get("data", {}))


def test_colourise_and_overlay():
    labels = np.array([[0, 1], [8, 2]], dtype=np.uint8)
    rgb = plots.colourise(labels)
    assert rgb.shape == (2, 2, 3) and tuple(rgb[1, 0]) == CLASS_COLOURS[8]
    only = plots.colourise(labels, where=np.array([[False, True], [False, False]]))
    assert tuple(only[0, 1]) == CLASS_COLOURS[1] and tuple(only[1, 0]) == (40, 40, 40)
    image = np.full((2, 2), 100, dtype=np.uint8)
    over = plots.overlay(image, labels, alpha=0.5)
    assert tuple(over[0, 0]) == (100, 100, 100)  # background stays see-through
    assert tuple(over[0, 1]) == tuple(round((100 + c) / 2) for c in CLASS_COLOURS[1])
    wrong = plots.overlay(image, labels, where=np.array([[True, False], [False, False]]))
    assert tuple(wrong[0, 0]) == (50, 50, 50) and tuple(wrong[0, 1]) == (100, 100, 100)


def test_dice_chart_uses_fixed_class_colours():
    dice = pd.DataFrame({"run": ["a", "a"], "class": ["NFL", "fluid"], "dice": [0.5, np.nan]})
    enc = plots.dice_chart(dice).to_dict()["encoding"]
    assert enc["color"]["scale"]["range"][1] == "#%02x%02x%02x" % CLASS_COLOURS[1]
