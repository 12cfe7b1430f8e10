"""Charts and mask renderings of the run store, shared by the app and reports.

Chart builders take plain DataFrames (``RunStore.list_runs()`` rows, stacked
histories) and return Altair charts whose top-level data is exactly what is drawn,
so :func:`chart_to_csv` exports the numbers behind the picture. Exports go through
vl-convert: offline, no browser, the same bytes in the app and in a report.
"""

from __future__ import annotations

import altair as alt
import numpy as np
import pandas as pd
import vl_convert as vlc

from .classes import CLASS_COLOURS, CLASS_NAMES, CLASS_SLUGS
from .config import METHODS, MODELS

#: Fixed per method so a method keeps its colour on every chart and page.
METHOD_SCALE = alt.Scale(domain=list(METHODS),
                         range=["#555555", "#1f77b4", "#d62728", "#2ca02c"])
MODEL_SCALE = alt.Scale(domain=list(MODELS), range=["circle", "triangle-up"])
CLASS_SCALE = alt.Scale(domain=list(CLASS_NAMES),
                        range=["#%02x%02x%02x" % rgb for rgb in CLASS_COLOURS])
PALETTE = np.array(CLASS_COLOURS, dtype=np.uint8)

#: Utility axis choices: label -> ``list_runs()`` column (last epoch's validation value).
UTILITY_METRICS = {
    "mean foreground Dice": "val_dice_fg_mean",
    "all-class Dice": "val_dice_all_mean",
    "pixel accuracy": "val_pixel_accuracy",
    **{f"Dice: {name}": f"val_dice_{slug}" for name, slug in zip(CLASS_NAMES, CLASS_SLUGS)},
}
#: Per-epoch series of the Curves page: title -> history columns drawn together.
CURVES = {
    "loss": ["train_loss", "val_loss"],
    "validation Dice": ["val_dice_fg_mean", "val_dice_all_mean"],
    "ε spent": ["epsilon"],
    "gradient-norm median": ["grad_norm_median"],
    "clipped fraction": ["clipped_fraction"],
}
#: A run's configuration as shown in tooltips (whichever of these the table has).
CONFIG_FIELDS = ("run_id", "model", "method", "noise_multiplier", "max_grad_norm",
                 "clipping", "final_rate", "refresh", "epsilon", "delta", "epochs",
                 "batch_size", "lr", "image_size", "seed", "status")
WIDTH, HEIGHT = 480, 300


def metric_label(column: str) -> str:
    return next((k for k, v in UTILITY_METRICS.items() if v == column), column)


def pareto_front(df: pd.DataFrame, x: str, y: str) -> pd.DataFrame:
    """Rows no other row beats on both axes, lower ``x`` (ε spent) and higher ``y``
    (utility) being better, sorted by ``x``; rows missing either value are ignored."""
    d = df.dropna(subset=[x, y]).sort_values([x, y], ascending=[True, False], kind="stable")
    best_before = d[y].cummax().shift(fill_value=-np.inf)
    return d[d[y] > best_before]


def _run_fields(runs: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Tooltip fields and the metric of the runs that have a value for it.

    A table of broken runs lacks most columns and mixes types: coerce, never fail.
    """
    data = runs[[c for c in dict.fromkeys((*CONFIG_FIELDS, metric)) if c in runs.columns]].copy()
    for col in ("method", "model"):
        if col not in data:
            data[col] = pd.Series(dtype=object)
    for col in ("epsilon", "noise_multiplier", metric):
        data[col] = pd.to_numeric(data[col], errors="coerce") if col in data else np.nan
    return data[data[metric].notna()]


def _tooltip(data: pd.DataFrame, fields) -> list[alt.Tooltip]:
    """Typed tooltips (inference fails on an empty table) for the fields ``data`` has."""
    return [alt.Tooltip(field=c, type="quantitative" if pd.api.types.is_numeric_dtype(data[c])
                        else "nominal")
            for c in dict.fromkeys(fields) if c in data.columns]


def _points(data: pd.DataFrame, x: alt.X, y: str, label: str) -> alt.Chart:
    return alt.Chart(data).mark_point(filled=True, size=80, opacity=0.85).encode(
        x=x, y=alt.Y(f"{y}:Q", title=label, scale=alt.Scale(zero=False)),
        color=alt.Color("method:N", scale=METHOD_SCALE, title="method"),
        shape=alt.Shape("model:N", scale=MODEL_SCALE, title="model"),
        tooltip=_tooltip(data, (y, *CONFIG_FIELDS)))


def frontier_chart(runs: pd.DataFrame, metric: str = "val_dice_fg_mean",
                   spread: str | None = None) -> alt.LayerChart:
    """ε (log) against utility: DP runs as points, each method's Pareto front as a line,
    non-private runs as horizontal rules (their ε is infinite, not missing). With
    ``spread`` (a column of per-row spreads, e.g. the seed std of a report's summary),
    each point gets a ± bar."""
    data = _run_fields(runs, metric)
    data = data[(data["method"] == "non_dp") | (data["epsilon"] > 0)].copy()
    bars = []
    if spread is not None and spread in runs:
        sd = pd.to_numeric(runs.loc[data.index, spread], errors="coerce")
        data[spread] = sd
        data["lower"], data["upper"] = data[metric] - sd, data[metric] + sd
    data["on_front"] = False
    for _, group in data[data["method"] != "non_dp"].groupby("method"):
        data.loc[pareto_front(group, "epsilon", metric).index, "on_front"] = True
    label = metric_label(metric)
    x = alt.X("epsilon:Q", title="ε (log scale)", scale=alt.Scale(type="log"))
    colour = alt.Color("method:N", scale=METHOD_SCALE)
    points = _points(data, x, metric, label).transform_filter(alt.datum.method != "non_dp")
    front = alt.Chart(data).mark_line(strokeWidth=2).encode(
        x=x, y=f"{metric}:Q", order="epsilon:Q", color=colour,
    ).transform_filter(alt.datum.on_front)
    rules = alt.Chart(data).mark_rule(strokeDash=[6, 4], strokeWidth=1.5).encode(
        y=f"{metric}:Q", color=colour, tooltip=_tooltip(data, (metric, *CONFIG_FIELDS)),
    ).transform_filter(alt.datum.method == "non_dp")
    if "lower" in data:
        bars = [alt.Chart(data).mark_rule(strokeWidth=1.5).encode(
            x=x, y="lower:Q", y2="upper:Q", color=colour,
        ).transform_filter((alt.datum.method != "non_dp") & alt.expr.isValid(alt.datum.lower))]
    return alt.layer(rules, front, *bars, points, data=data).properties(
        width=WIDTH, height=HEIGHT, title=f"Privacy–utility frontier: {label}")


def noise_chart(runs: pd.DataFrame, metric: str = "val_dice_fg_mean") -> alt.LayerChart:
    """Utility against the noise multiplier σ, with each method × model's mean as a line."""
    data = _run_fields(runs, metric)
    data = data[(data["method"] != "non_dp") & data["noise_multiplier"].notna()]
    label = metric_label(metric)
    x = alt.X("noise_multiplier:Q", title="noise multiplier σ")
    means = alt.Chart(data).mark_line().encode(
        x=x, y=f"mean({metric}):Q", color=alt.Color("method:N", scale=METHOD_SCALE),
        strokeDash=alt.StrokeDash("model:N", title="model"))
    return alt.layer(means, _points(data, x, metric, label), data=data).properties(
        width=WIDTH, height=HEIGHT, title=f"{label} against noise multiplier")


def audit_chart(runs: pd.DataFrame) -> alt.LayerChart:
    """Membership-inference AUC against ε: DP runs (or configurations) as points,
    non-private ones as dashed rules (ε = ∞), chance (0.5) as a grey rule.

    Audits whose non-members are other patients mix leakage with the patient shift, so
    where any audit used same-subject non-members (``mia_same_subjects``) only those are
    drawn; the subtitle says which kind the chart shows.
    """
    data = runs[pd.to_numeric(runs["mia_auc"], errors="coerce").notna()].copy()
    for col in ("mia_auc", "epsilon"):
        data[col] = pd.to_numeric(data[col], errors="coerce")
    same = data.get("mia_same_subjects", pd.Series(False, index=data.index)).eq(True)
    if same.any():
        data = data[same]
        subtitle = "non-members: unseen images of the training subjects (or distribution)"
    else:
        subtitle = "non-members: other patients, so the AUC mixes leakage with patient shift"
    data = data[(data["method"] == "non_dp") | (data["epsilon"] > 0)]
    data = data[[c for c in dict.fromkeys(("config", *CONFIG_FIELDS, "n_seeds", "mia_auc",
                                           "mia_auc_std", "mia_reference_auc",
                                           "mia_same_subjects"))
                 if c in data.columns]]
    x = alt.X("epsilon:Q", title="ε (log scale)", scale=alt.Scale(type="log"))
    y = alt.Y("mia_auc:Q", title="membership-inference AUC", scale=alt.Scale(zero=False))
    colour = alt.Color("method:N", scale=METHOD_SCALE, title="method")
    tooltip = _tooltip(data, data.columns)
    points = alt.Chart(data).mark_point(filled=True, size=80).encode(
        x=x, y=y, color=colour, shape=alt.Shape("model:N", scale=MODEL_SCALE, title="model"),
        tooltip=tooltip,
    ).transform_filter(alt.datum.method != "non_dp")
    rules = alt.Chart(data).mark_rule(strokeDash=[6, 4]).encode(
        y="mia_auc:Q", color=colour, tooltip=tooltip,
    ).transform_filter(alt.datum.method == "non_dp")
    chance = alt.Chart(data).mark_rule(color="#999999").encode(y=alt.datum(0.5))
    return alt.layer(chance, rules, points, data=data).properties(
        width=WIDTH, height=HEIGHT,
        title=alt.Title("Empirical privacy: loss-threshold attack", subtitle=subtitle))


def curves_chart(history: pd.DataFrame, columns: list[str], title: str,
                 log_y: bool = False) -> alt.LayerChart:
    """Per-epoch series of several runs overlaid: colour per run, dash per series.

    Points sit on a layer of their own so a one-epoch run still shows and the dash
    legend keeps line symbols.
    """
    present = [c for c in columns if c in history.columns]
    ids = [c for c in ("run_id", "method", "model", "epoch") if c in history.columns]
    data = (history.melt(id_vars=ids, value_vars=present, var_name="series", value_name="value")
            .dropna(subset=["value"]) if present and "epoch" in ids
            else pd.DataFrame(columns=["run_id", "epoch", "series", "value"]))
    if log_y:
        data = data[data["value"] > 0]
    last = int(data["epoch"].max()) if len(data) else 1
    base = alt.Chart(data).encode(
        x=alt.X("epoch:Q", title="epoch", axis=alt.Axis(
            format="d", values=list(range(1, last + 1)) if last <= 20 else alt.Undefined)),
        y=alt.Y("value:Q", title=title,
                scale=alt.Scale(type="log" if log_y else "linear", zero=False)),
        color=alt.Color("run_id:N", title="run", legend=alt.Legend(labelLimit=320)),
        tooltip=_tooltip(data, (*ids, "series", "value")))
    dash = ({"strokeDash": alt.StrokeDash("series:N", title="series",
                                          legend=alt.Legend(symbolType="stroke"))}
            if len(present) > 1 else {})
    return alt.layer(base.mark_line().encode(**dash), base.mark_point(filled=True),
                     data=data).properties(width=WIDTH, height=HEIGHT, title=title)


def epsilon_epochs_chart(history: pd.DataFrame) -> alt.LayerChart:
    """How fast each DP run spends its budget: ε after every epoch (log)."""
    return curves_chart(history, ["epsilon"], "ε spent (log scale)", log_y=True)


def dice_chart(dice: pd.DataFrame) -> alt.Chart:
    """Per-class Dice bars (columns ``class``, ``dice``, ``run``) in the classes' colours,
    one bar per run side by side, so the chart doubles as the mask legend."""
    return alt.Chart(dice).mark_bar().encode(
        y=alt.Y("class:N", sort=list(CLASS_NAMES), title=None),
        yOffset=alt.YOffset("run:N"),
        x=alt.X("dice:Q", title="Dice on this B-scan", scale=alt.Scale(domain=[0, 1])),
        color=alt.Color("class:N", scale=CLASS_SCALE, legend=None),
        opacity=alt.Opacity("run:N", scale=alt.Scale(range=[1.0, 0.45]), title="run",
                            legend=alt.Legend(labelLimit=320, orient="bottom")),
        tooltip=["run", "class", alt.Tooltip("dice:Q", format=".3f")],
    ).properties(width=WIDTH, title="Per-class Dice")


def comparison_chart(charts: list[alt.TopLevelMixin], title: str) -> alt.VConcatChart:
    """Several charts stacked into one figure for a single PNG/PDF export."""
    return alt.vconcat(*charts, title=title).resolve_scale(color="independent",
                                                          shape="independent")


# --- masks -----------------------------------------------------------------------------

def colourise(labels: np.ndarray, where: np.ndarray | None = None,
              fill=(40, 40, 40)) -> np.ndarray:
    """RGB image of class labels in the fixed class colours; outside ``where``, ``fill``."""
    rgb = PALETTE[labels]
    if where is not None:
        rgb[~where] = fill
    return rgb


def overlay(image: np.ndarray, labels: np.ndarray, where: np.ndarray | None = None,
            alpha: float = 0.5) -> np.ndarray:
    """Labels blended over the greyscale B-scan; background stays see-through unless
    ``where`` (e.g. the disagreement mask) says otherwise."""
    grey = np.repeat(np.asarray(image, dtype=np.float32)[..., None], 3, axis=-1)
    paint = labels > 0 if where is None else where
    grey[paint] = (1 - alpha) * grey[paint] + alpha * PALETTE[labels[paint]]
    return grey.round().astype(np.uint8)


# --- exports ---------------------------------------------------------------------------

def chart_to_png(chart: alt.TopLevelMixin, scale: float = 2.0) -> bytes:
    return vlc.vegalite_to_png(chart.to_json(), scale=scale, allowed_base_urls=[])


def chart_to_svg(chart: alt.TopLevelMixin) -> str:
    return vlc.vegalite_to_svg(chart.to_json(), allowed_base_urls=[])


def chart_to_pdf(chart: alt.TopLevelMixin) -> bytes:
    return vlc.vegalite_to_pdf(chart.to_json(), allowed_base_urls=[])


def chart_to_csv(chart: alt.TopLevelMixin) -> bytes:
    """The chart's top-level data (what every builder here draws from) as CSV."""
    if not isinstance(chart.data, pd.DataFrame):
        raise ValueError("chart has no top-level DataFrame to export")
    return chart.data.to_csv(index=False).encode()
