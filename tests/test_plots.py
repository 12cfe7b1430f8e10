"""Chart builders and exports: pure functions of DataFrames, checked without Streamlit."""

import io
import json
import struct

import re

import altair as alt
import numpy as np
import pandas as pd
import pytest

from dpstudy import plots, report
from dpstudy.classes import CLASS_COLOURS, CLASS_NAMES
from dpstudy.config import METHODS


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


def layers(chart) -> dict:
    """The chart's layers by mark type (the last layer of each type)."""
    return {(layer["mark"]["type"] if isinstance(layer["mark"], dict) else layer["mark"]): layer
            for layer in chart.to_dict()["layer"]}


def rendered_text(chart, field: str, data: pd.DataFrame) -> list[str]:
    """What Vega computes for a calculated ``field`` of ``chart`` on each row of ``data``:
    drawn as text marks, one per row, read back from the SVG."""
    calc = [t for t in chart.to_dict().get("transform", []) if "calculate" in t]
    probe = alt.Chart(data.assign(row=range(len(data)))).mark_text().encode(
        y=alt.Y("row:O", axis=None), text=f"{field}:N").transform_calculate(
        **{t["as"]: t["calculate"] for t in calc})
    svg = plots.chart_to_svg(probe)
    return re.findall(r'<text[^>]*text-anchor="middle"[^>]*>([^<]*)</text>', svg)


def test_frontier_chart_draws_dp_points_fronts_and_non_private_rule(runs):
    chart = plots.frontier_chart(runs)
    data = chart.data.set_index("run_id")
    assert set(data.index) == {"np", "s1", "s2", "s3", "a2"}  # broken run left out
    assert data["on_front"].to_dict() == {"np": False, "s1": True, "s2": True, "s3": False,
                                          "a2": True}
    marks = layers(chart)
    assert marks["point"]["encoding"]["x"]["scale"] == {"type": "log"}
    assert {"shape", "color", "tooltip"} <= set(marks["point"]["encoding"])
    assert marks["rule"]["encoding"]["color"]["scale"] == plots.METHOD_SCALE.to_dict()
    # each method's front has its own dash, so equal fronts stay distinguishable
    assert marks["line"]["encoding"]["strokeDash"]["scale"] == plots.METHOD_DASH_SCALE.to_dict()
    assert len({str(d) for d in plots.METHOD_DASH_SCALE.to_dict()["range"]}) == len(METHODS)


def test_non_private_reference_line_is_labelled(runs):
    svg = plots.chart_to_svg(plots.frontier_chart(runs))
    assert "non-private U-Net" in svg
    assert "B-scan-level ε (log scale)" in svg


def test_one_palette_for_every_chart_and_the_report(runs, history):
    """Method colours come from one scale everywhere; legends say human names."""
    audit = runs.assign(mia_auc=[0.6, 0.5, 0.52, 0.51, 0.5, None],
                        epsilon_lower_bound=[2.0, 0.5, None, 0.3, 0.2, None])
    charts = [plots.frontier_chart(runs), plots.noise_chart(runs), plots.audit_chart(audit),
              plots.empirical_epsilon_chart(audit),
              report.curves_chart(history.assign(config=1, val_dice_fg_mean=0.5))]
    for chart in charts:
        colours = [enc["color"] for enc in _encodings(chart.to_dict())
                   if enc.get("color", {}).get("field") == "method"]
        assert colours, chart
        for colour in colours:
            assert colour["scale"] == plots.METHOD_SCALE.to_dict()
    legend = plots.method_colour().to_dict()["legend"]["labelExpr"]
    assert all(f"'{name}'" in legend for name in plots.METHOD_NAMES.values())
    assert plots.METHOD_SCALE.to_dict()["domain"] == list(METHODS)


def test_empirical_epsilon_chart_labels_the_claim_and_leaves_out_unaudited_runs(runs):
    audited = runs.assign(epsilon_lower_bound=[2.0, 0.5, None, 0.3, 0.2, None])
    chart = plots.empirical_epsilon_chart(audited)
    assert list(chart.data["run_id"]) == ["np", "s1", "s3", "a2"]
    svg = plots.chart_to_svg(chart)
    assert "claimed ε" in svg and "non-private U-Net" in svg
    assert "B-scan-level ε (theoretical)" in svg and "ε lower bound (audit, 95 %)" in svg
    assert rendered_text(chart, "tip_epsilon_lower_bound", chart.data) == ["2", "0.5", "0.3",
                                                                          "0.2"]


def _encodings(spec):
    """Every encoding block of a (possibly layered, faceted) spec."""
    if "encoding" in spec:
        yield spec["encoding"]
    for key in ("layer", "vconcat", "hconcat"):
        for sub in spec.get(key, []):
            yield from _encodings(sub)
    if "spec" in spec:
        yield from _encodings(spec["spec"])


def test_tooltips_are_human_and_never_null(runs):
    """σ = 1, not 1.000000; "–" where a run has no value; method names, not ids."""
    chart = plots.frontier_chart(runs)
    titles = [t["title"] for t in layers(chart)["point"]["encoding"]["tooltip"]]
    assert "noise multiplier σ" in titles and "B-scan-level ε" in titles
    assert not any("_" in t for t in titles)
    sigma = rendered_text(chart, "tip_noise_multiplier", chart.data)
    assert sigma == ["–", "1", "2", "1.5", "2"]
    assert rendered_text(chart, "tip_method", chart.data) == [
        "non-private", "DP-SGD", "DP-SGD", "DP-SGD", "Automatic Clipping"]


def test_points_of_methods_at_equal_epsilon_are_drawn_apart(runs):
    """s2 (DP-SGD) and a2 (Automatic Clipping) both spent ε = 2."""
    chart = plots.frontier_chart(runs)
    shown = rendered_text(chart, "epsilon_shown", chart.data.set_index("run_id").loc[
        ["s2", "a2"]].reset_index())
    assert len(set(shown)) == 2 and all(1.8 < float(v) < 2.2 for v in shown)
    assert layers(chart)["point"]["encoding"]["x"]["axis"]["format"] == "~g"


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
    assert len(chart.data) == 8
    assert set(chart.data["series"]) == {"training loss (diagnostic)", "validation loss"}
    assert "strokeDash" in chart.to_dict()["layer"][0]["encoding"]
    eps = plots.epsilon_epochs_chart(history)
    assert eps.data["run_id"].unique().tolist() == ["s1"]  # non-private: no ε
    assert plots.curves_chart(history, ["clipped_fraction"], "clipped").data.empty


def test_a_run_keeps_its_colour_on_every_chart(history):
    """The ε chart shows only the DP run; given the page's run list it colours it as the
    loss chart does (without it, s1 would take the first colour, np's)."""
    ids = ["np", "s1"]
    loss = plots.curves_chart(history, ["train_loss"], "loss", runs=ids)
    eps = plots.epsilon_epochs_chart(history, runs=ids)

    def colour_of(chart, run):
        scale = chart.to_dict()["layer"][0]["encoding"]["color"]["scale"]
        return scale["range"][scale["domain"].index(run)]
    assert colour_of(loss, "s1") == colour_of(eps, "s1") != colour_of(loss, "np")
    assert not set(plots.RUN_COLOURS) & set(plots.METHOD_COLOURS.values())


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
    assert tuple(only[0, 1]) == CLASS_COLOURS[1] and tuple(only[1, 0]) == plots.AGREE_COLOUR
    assert plots.AGREE_COLOUR not in CLASS_COLOURS  # agreeing pixels never read as a class
    image = np.full((2, 2), 100, dtype=np.uint8)
    over = plots.overlay(image, labels, alpha=0.5)
    assert tuple(over[0, 0]) == (100, 100, 100)  # background stays see-through
    assert tuple(over[0, 1]) == tuple(round((100 + c) / 2) for c in CLASS_COLOURS[1])
    wrong = plots.overlay(image, labels, where=np.array([[True, False], [False, False]]))
    assert tuple(wrong[0, 0]) == (50, 50, 50) and tuple(wrong[0, 1]) == (100, 100, 100)


def test_dice_chart_uses_fixed_class_colours_and_labels_zero_and_absent():
    dice = pd.DataFrame({"run": ["A", "A", "A", "B", "B", "B"],
                         "class": ["NFL", "INL", "fluid"] * 2,
                         "dice": [0.5, 0.0, np.nan, 0.25, 0.0, 0.0]})
    chart = plots.dice_chart(dice, {"A": "A: run-a", "B": "B: run-b"})
    bars = layers(chart)["bar"]["encoding"]
    assert bars["color"]["scale"]["range"][1] == "#%02x%02x%02x" % CLASS_COLOURS[1]
    assert bars["color"]["scale"]["domain"] == list(CLASS_NAMES)
    assert chart.data["label"].tolist() == ["A 0.50", "A 0", "A absent", "B 0.25", "B 0", "B 0"]
    svg = plots.chart_to_svg(chart)
    for text in ("A 0", "A absent", "B 0.25", "A: run-a", "B: run-b"):
        assert f">{text}<" in svg, text
    opacity = bars["opacity"]["scale"]
    assert opacity["domain"] == ["A", "B"] and opacity["range"][0] > opacity["range"][1]


def test_settings_chart_gives_each_configuration_and_anchor_a_row():
    rows = pd.DataFrame({"label": ["2. Automatic Clipping, ε 3, depth 4",
                                   "3. Automatic Clipping, ε 3, depth 5", "4. non-private"],
                         "method": ["auto_clip", "auto_clip", "non_dp"],
                         "val_dice_fg_mean": [0.763, 0.757, 0.816],
                         "val_dice_fg_std": [0.006, np.nan, 0.004], "n_seeds": [3, 1, 3]})
    anchors = pd.DataFrame({"model": ["unet"], "base_width": [16], "depth": [4],
                            "val_dice_fg_mean": [0.720]})
    chart = plots.settings_chart(rows, spread="val_dice_fg_std", anchors=anchors)
    data = chart.data
    assert list(data["label"]) == [*rows["label"], "ε = 0: U-Net pretraining alone"]
    assert list(data["shown"]) == ["0.763 ± 0.006", "0.757 (1 seed)", "0.816 ± 0.004", "0.720"]
    assert data["lower"].iloc[0] == pytest.approx(0.757) and np.isnan(data["lower"].iloc[1])
    spec = chart.to_dict()
    assert spec["layer"][1]["encoding"]["y"]["sort"] == list(data["label"])   # rows as given
    svg = plots.chart_to_svg(chart)
    assert "0.763 ± 0.006" in svg and "ε = 0: U-Net pretraining alone" in svg
