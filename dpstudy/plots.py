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

#: The study's one visual language: every chart of the app, the report and the exports
#: takes method and model names and encodings from here. A method has one colour (and
#: one dash, so equal lines stay distinguishable), a model one shape and one dash.
METHOD_NAMES = {"non_dp": "non-private", "dp_sgd": "DP-SGD", "auto_clip": "Automatic Clipping",
                "random_sparsification": "Random Sparsification"}
MODEL_NAMES = {"unet": "U-Net", "nested_unet": "Nested U-Net"}
METHOD_COLOURS = {"non_dp": "#555555", "dp_sgd": "#1f77b4", "auto_clip": "#d62728",
                  "random_sparsification": "#2ca02c"}
METHOD_DASHES = {"non_dp": [6, 4], "dp_sgd": [1, 0], "auto_clip": [7, 3],
                 "random_sparsification": [2, 2]}
MODEL_SHAPES = {"unet": "circle", "nested_unet": "triangle-up"}
MODEL_DASHES = {"unet": [1, 0], "nested_unet": [5, 3]}
#: Colours of runs where a chart tells runs apart (a run keeps its colour on every chart
#: of a page: see :func:`run_scale`); none of them is a method's colour.
RUN_COLOURS = ["#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22", "#393b79",
               "#ad494a", "#637939", "#7b4173", "#3182bd", "#e6550d"]
#: Colours of methods or models another module may add, in turn.
SPARE = ["#7f7f7f", "#17becf", "#bcbd22", "#e377c2"]


def _scale(keys, fixed: dict, spare) -> alt.Scale:
    return alt.Scale(domain=list(keys),
                     range=[fixed.get(k, spare[i % len(spare)]) for i, k in enumerate(keys)])


METHOD_SCALE = _scale(METHODS, METHOD_COLOURS, SPARE)
METHOD_DASH_SCALE = _scale(METHODS, METHOD_DASHES, [[4, 2, 1, 2]])
MODEL_SCALE = _scale(MODELS, MODEL_SHAPES, ["square", "diamond", "cross"])
MODEL_DASH_SCALE = _scale(MODELS, MODEL_DASHES, [[1, 3]])
CLASS_SCALE = alt.Scale(domain=list(CLASS_NAMES),
                        range=["#%02x%02x%02x" % rgb for rgb in CLASS_COLOURS])
PALETTE = np.array(CLASS_COLOURS, dtype=np.uint8)
#: Where a disagreement-only mask view paints pixels that agree with the truth.
AGREE_COLOUR, AGREE_NAME = (190, 190, 190), "light grey"

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
    "B-scan-level ε spent": ["epsilon"],
    "gradient-norm median": ["grad_norm_median"],
    "clipped fraction": ["clipped_fraction"],
}
#: A run's configuration as shown in tooltips (whichever of these the table has).
CONFIG_FIELDS = ("run_id", "model", "method", "noise_multiplier", "max_grad_norm",
                 "clipping", "final_rate", "refresh", "epsilon", "delta", "epochs",
                 "batch_size", "lr", "image_size", "seed", "status")
#: Settings that mean nothing for a non-private run (left out of its tooltip).
PRIVATE_FIELDS = ("noise_multiplier", "max_grad_norm", "clipping", "final_rate", "refresh",
                  "epsilon", "delta")
#: Human names of columns, for tooltips, axes and tables.
TITLES = {
    "run_id": "run", "noise_multiplier": "noise multiplier σ",
    "max_grad_norm": "clipping bound C", "clipping": "clipping style",
    "final_rate": "sparsification r*", "refresh": "masks per epoch",
    "epsilon": "B-scan-level ε", "delta": "δ", "batch_size": "batch size",
    "lr": "learning rate", "image_size": "image size", "target_epsilon": "target ε",
    "mia_auc": "membership-inference AUC", "mia_auc_std": "AUC spread (sd)",
    "mia_reference_auc": "AUC of the starting weights", "n_seeds": "seeds",
    "mia_same_subjects": "same-patient non-members", "config": "configuration",
    "epsilon_lower_bound": "B-scan-level ε lower bound (audit, 95 %)",
    "audit_canaries": "audit canaries", "mia_auc_gain": "MIA AUC gain",
    "mia_verdict": "membership audit verdict",
    # computed from private data without noise: diagnostics, not covered by ε
    "train_loss": "training loss (diagnostic)", "val_loss": "validation loss",
    "grad_norm_median": "gradient-norm median", "clipped_fraction": "clipped fraction",
    "series": "series", "value": "value", "dice": "Dice",
    **{v: k for k, v in UTILITY_METRICS.items()},
}
#: Axis number formats: no trailing zeros (σ = 1, not 1.000000).
NUMBER = "~g"
WIDTH, HEIGHT = 480, 300


def column_title(column: str) -> str:
    return TITLES.get(column, column.replace("_", " "))


def _names_expr(field: str, names: dict) -> str:
    """A Vega expression giving ``names[value]`` of ``field`` (the value if unnamed)."""
    expr = f"datum[{field!r}]"
    for key, name in names.items():
        expr = f"datum[{field!r}] == {key!r} ? {name!r} : ({expr})"
    return expr


def _legend(names: dict, **kwargs) -> alt.Legend:
    return alt.Legend(labelExpr=_names_expr("label", names), **kwargs)


def method_colour(legend: bool = True) -> alt.Color:
    return alt.Color("method:N", scale=METHOD_SCALE, title="method",
                     legend=_legend(METHOD_NAMES) if legend else None)


def model_shape() -> alt.Shape:
    return alt.Shape("model:N", scale=MODEL_SCALE, title="model", legend=_legend(MODEL_NAMES))


def run_scale(run_ids) -> alt.Scale:
    """Colours of runs in a fixed order, so a run has the same colour on every chart
    drawn with the same ``run_ids``, whichever of them a chart shows."""
    ids = list(dict.fromkeys(run_ids))
    return alt.Scale(domain=ids, range=[RUN_COLOURS[i % len(RUN_COLOURS)]
                                        for i in range(len(ids))])


def _tooltip(data: pd.DataFrame, fields) -> tuple[dict, list[alt.Tooltip]]:
    """Tooltips with human titles and readable values: the names of methods and models,
    numbers without trailing zeros, "–" for a missing value (never ``null``). Returns the
    calculated fields to add (``transform_calculate``) and the tooltip encodings."""
    calc, tips = {}, []
    for c in dict.fromkeys(fields):
        if c not in data.columns:
            continue
        value = f"datum[{c!r}]"
        if c in ("method", "model"):
            expr = _names_expr(c, METHOD_NAMES if c == "method" else MODEL_NAMES)
        elif (pd.api.types.is_numeric_dtype(data[c])
              and not pd.api.types.is_bool_dtype(data[c])):
            expr = f"isValid({value}) && isFinite({value}) ? format({value}, '.4~g') : '–'"
        else:
            expr = f"isValid({value}) ? '' + {value} : '–'"
        calc[f"tip_{c}"] = expr
        tips.append(alt.Tooltip(f"tip_{c}:N", title=column_title(c)))
    return calc, tips


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


def _dodge(x: str, step: float, log: bool) -> str:
    """A Vega expression placing each method's points slightly apart along ``x`` (by
    ``step``, a factor on a log axis), so runs of different methods at the same σ or ε do
    not hide each other; tooltips keep the true value."""
    order = [m for m in METHODS if m != "non_dp"]
    k = f"(indexof({order!r}, datum.method) - {(len(order) - 1) / 2})"
    return f"datum[{x!r}] * pow({step}, {k})" if log else f"datum[{x!r}] + {step} * {k}"


def _x(field: str, label: str, log: bool) -> alt.X:
    return alt.X(f"{field}_shown:Q", title=label, axis=alt.Axis(format=NUMBER),
                 scale=alt.Scale(type="log") if log else alt.Undefined)


def _points(x: alt.X, y: str, label: str, tips: list) -> alt.Chart:
    return alt.Chart().mark_point(filled=True, size=80, opacity=0.85).encode(
        x=x, y=alt.Y(f"{y}:Q", title=label, scale=alt.Scale(zero=False),
                     axis=alt.Axis(format=NUMBER)),
        color=method_colour(), shape=model_shape(), tooltip=tips)


def _reference(metric: str, tips: list) -> list[alt.Chart]:
    """Non-private runs as dashed rules across the chart (their ε is infinite, not
    missing), each labelled at its right end."""
    public = alt.datum.method == "non_dp"
    rule = alt.Chart().mark_rule(strokeDash=METHOD_DASHES["non_dp"], strokeWidth=1.5).encode(
        y=f"{metric}:Q", color=method_colour(), tooltip=tips).transform_filter(public)
    text = alt.Chart().mark_text(align="right", baseline="bottom", dy=-2, fontSize=11).encode(
        x=alt.value(WIDTH - 2), y=f"{metric}:Q", text="reference:N",
        color=method_colour(legend=None),
    ).transform_filter(public).transform_calculate(
        reference=f"'non-private ' + ({_names_expr('model', MODEL_NAMES)})")
    return [rule, text]


#: Anchors closer than this (in the metric) share one label: their rules are drawn
#: apart, but a line of text each would print one over the other.
ANCHOR_LABEL_GAP = 0.01


def _anchor_names(anchors: pd.DataFrame) -> list[str]:
    """Each anchor's model, with its width and depth where anchors of that model differ
    in them, and its image size where they differ in that."""
    arch = anchors.reindex(columns=["model", "base_width", "depth", "image_size"])
    sizes = arch.astype(str).groupby("model")
    shape = sizes[["base_width", "depth"]].nunique().max(axis=1)
    size = sizes["image_size"].nunique()
    return [MODEL_NAMES.get(m, m) + (f" width {w:g}, depth {d:g}" if shape[m] > 1 else "")
            + (f" at {s}" if size[m] > 1 else "")
            for m, w, d, s in arch.itertuples(index=False)]


def _anchor_labels(anchors: pd.DataFrame, metric: str) -> pd.DataFrame:
    """One label per cluster of anchors (with their ``name``) closer than
    :data:`ANCHOR_LABEL_GAP`, at the cluster's highest rule, naming every anchor in it."""
    clusters: list[list] = []
    for name, value in anchors.sort_values(metric, ascending=False)[["name", metric]].itertuples(
            index=False):
        if not clusters or clusters[-1][0][1] - value >= ANCHOR_LABEL_GAP:
            clusters.append([])
        clusters[-1].append((name, value))
    return pd.DataFrame({
        metric: [members[0][1] for members in clusters],
        "label": ["ε = 0: " + ", ".join(f"{n} pretraining alone {v:.3f}" for n, v in members)
                  for members in clusters]})


def _anchor_rules(anchors: pd.DataFrame | None, metric: str) -> list[alt.Chart]:
    """The ε = 0 anchors as dotted grey rules labelled above their left end (an anchor is
    usually the lowest value drawn: a label below it would sit on the axis)."""
    if anchors is None or anchors.empty or metric not in anchors:
        return []
    named = anchors.assign(name=_anchor_names(anchors))
    rules = named.assign(label=[f"{n} {v:.3f}" for n, v in zip(named["name"], named[metric])])
    return [alt.Chart(rules).mark_rule(color="#888888", strokeDash=[1, 3], strokeWidth=2).encode(
                y=f"{metric}:Q", tooltip=[alt.Tooltip("label:N", title="ε = 0 anchor")]),
            alt.Chart(_anchor_labels(named, metric)).mark_text(
                align="left", baseline="bottom", dx=4, dy=-3, fontSize=11, color="#666666"
            ).encode(x=alt.value(0), y=f"{metric}:Q", text="label:N")]


def _tips(data: pd.DataFrame, metric: str, extra=()) -> tuple[dict, list, list]:
    """Calculated fields, tooltips of private runs, tooltips of non-private runs."""
    fields = (metric, *extra, *CONFIG_FIELDS)
    calc, tips = _tooltip(data, fields)
    return calc, tips, _tooltip(data, [f for f in fields if f not in PRIVATE_FIELDS])[1]


def frontier_chart(runs: pd.DataFrame, metric: str = "val_dice_fg_mean",
                   spread: str | None = None,
                   anchors: pd.DataFrame | None = None) -> alt.LayerChart:
    """ε (log) against utility: DP runs as points, each method's Pareto front as a line
    (one dash per method), non-private runs as labelled horizontal rules. With ``spread``
    (a column of per-row spreads, e.g. the seed std of a report's summary), each point
    gets a ± bar. ``anchors`` (:func:`dpstudy.anchor.epsilon_zero_anchors`): the ε = 0
    score of the public pretraining per model, a dotted labelled rule."""
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
    x = _x("epsilon", "B-scan-level ε (log scale)", log=True)
    private = alt.datum.method != "non_dp"
    calc, tips, public = _tips(data, metric, (spread,) if spread else ())
    front = alt.Chart().mark_line(strokeWidth=2).encode(
        x=x, y=f"{metric}:Q", order="epsilon:Q", color=method_colour(),
        strokeDash=alt.StrokeDash("method:N", scale=METHOD_DASH_SCALE, legend=None),
    ).transform_filter(alt.datum.on_front)
    if "lower" in data:
        bars = [alt.Chart().mark_rule(strokeWidth=1.5).encode(
            x=x, y="lower:Q", y2="upper:Q", color=method_colour(),
        ).transform_filter(private & alt.expr.isValid(alt.datum.lower))]
    points = _points(x, metric, label, tips).transform_filter(private)
    return alt.layer(*_anchor_rules(anchors, metric), *_reference(metric, public), front,
                     *bars, points, data=data).transform_calculate(
        epsilon_shown=_dodge("epsilon", 1.06, log=True), **calc).properties(
        width=WIDTH, height=HEIGHT, title=f"Privacy–utility frontier: {label}")


def mean_spread(mean, spread, digits: int = 3) -> str:
    """"0.763 ± 0.006" (the mean alone where the spread is missing; "" without a mean)."""
    if pd.isna(mean):
        return ""
    return f"{mean:.{digits}f}" + ("" if pd.isna(spread) else f" ± {spread:.{digits}f}")


def differing_columns(frame: pd.DataFrame, columns) -> list[str]:
    """Those of ``columns`` (in their order) in which the rows of ``frame`` differ: what a
    label must name to tell them apart (unset counts as a value)."""
    return [c for c in columns if c in frame and frame[c].astype(str).nunique(dropna=False) > 1]


def setting_value(v) -> str:
    """A run setting as a label shows it: 128×128, 0.002, adapters; "" where unset."""
    if isinstance(v, (list, tuple)):
        return "×".join(map(str, v))
    if isinstance(v, float):
        return "" if pd.isna(v) else f"{v:g}"
    return "" if v is None else str(v)


def settings_chart(rows: pd.DataFrame, metric: str = "val_dice_fg_mean",
                   spread: str | None = None,
                   anchors: pd.DataFrame | None = None) -> alt.LayerChart:
    """Configurations read side by side, one row each (``rows["label"]``: what sets it
    apart, in the order given), utility ± ``spread`` along x and written beside each
    point (with "(1 seed)" where ``rows["n_seeds"]`` says so): a study of levers at one
    privacy budget, which a frontier would stack on one ε. The ε = 0 anchors
    (:func:`dpstudy.anchor.epsilon_zero_anchors`) are grey diamond rows below them."""
    data = pd.DataFrame({"label": rows["label"].to_numpy(), "method": rows["method"].to_numpy(),
                         metric: pd.to_numeric(rows[metric], errors="coerce").to_numpy()})
    sd = (pd.to_numeric(rows[spread], errors="coerce").to_numpy() if spread and spread in rows
          else np.full(len(rows), np.nan))
    data["lower"], data["upper"] = data[metric] - sd, data[metric] + sd
    seeds = rows["n_seeds"].to_numpy() if "n_seeds" in rows else np.full(len(rows), np.nan)
    data["shown"] = [mean_spread(m, d) + (" (1 seed)" if n == 1 else "")
                     for m, d, n in zip(data[metric], sd, seeds)]
    if anchors is not None and len(anchors) and metric in anchors:
        named = pd.DataFrame({"label": [f"ε = 0: {n} pretraining alone"
                                        for n in _anchor_names(anchors)],
                              metric: anchors[metric].to_numpy()})
        named["shown"] = [mean_spread(v, None) for v in named[metric]]
        data = pd.concat([data, named.drop_duplicates("label")], ignore_index=True)
    label = metric_label(metric)
    y = alt.Y("label:N", sort=list(data["label"]), title=None, axis=alt.Axis(labelLimit=420))
    x = alt.X(f"{metric}:Q", title=label, scale=alt.Scale(zero=False, padding=70),
              axis=alt.Axis(format=NUMBER, labelOverlap=True))   # room for the last text
    tips = [alt.Tooltip("label:N", title="configuration"), alt.Tooltip("shown:N", title=label)]
    has_method = alt.expr.isValid(alt.datum.method)
    bars = alt.Chart().mark_rule(strokeWidth=1.5).encode(
        x="lower:Q", x2="upper:Q", y=y, color=method_colour()
    ).transform_filter(has_method & alt.expr.isValid(alt.datum.lower))
    points = alt.Chart().mark_point(filled=True, size=90, opacity=0.9).encode(
        x=x, y=y, color=method_colour(), tooltip=tips).transform_filter(has_method)
    anchor_points = alt.Chart().mark_point(shape="diamond", filled=True, size=90,
                                           color="#888888").encode(
        x=x, y=y, tooltip=tips).transform_filter(~has_method)
    text = alt.Chart().mark_text(align="left", dx=8, dy=-9, fontSize=11, color="#444444").encode(
        x=x, y=y, text="shown:N")
    return alt.layer(bars, points, anchor_points, text, data=data).properties(
        width=WIDTH, height=28 * len(data), title=f"{label} by configuration")


def noise_chart(runs: pd.DataFrame, metric: str = "val_dice_fg_mean") -> alt.LayerChart:
    """Utility against the noise multiplier σ, with each method × model's mean as a line
    (colour per method, dash per model)."""
    data = _run_fields(runs, metric)
    data = data[(data["method"] != "non_dp") & data["noise_multiplier"].notna()]
    label = metric_label(metric)
    span = float(np.ptp(data["noise_multiplier"])) if len(data) else 0.0
    x = _x("noise_multiplier", "noise multiplier σ", log=False)
    calc, tips, _ = _tips(data, metric)
    means = alt.Chart().mark_line().encode(
        x=x, y=f"mean({metric}):Q", color=method_colour(),
        strokeDash=alt.StrokeDash("model:N", scale=MODEL_DASH_SCALE, title="model",
                                  legend=_legend(MODEL_NAMES, symbolType="stroke")))
    return alt.layer(means, _points(x, metric, label, tips), data=data).transform_calculate(
        noise_multiplier_shown=_dodge("noise_multiplier", 0.012 * (span or 1), log=False),
        **calc).properties(
        width=WIDTH, height=HEIGHT, title=f"{label} against noise multiplier")


def audit_chart(runs: pd.DataFrame) -> alt.LayerChart:
    """Membership-inference AUC against ε: DP runs (or configurations) as points,
    non-private ones as labelled dashed rules (ε = ∞), chance (0.5) as a grey rule.

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
    x = _x("epsilon", "B-scan-level ε (log scale)", log=True)
    calc, tips, public = _tips(data, "mia_auc", data.columns)
    points = _points(x, "mia_auc", "membership-inference AUC", tips).transform_filter(
        alt.datum.method != "non_dp")
    chance = alt.Chart().mark_rule(color="#999999").encode(y=alt.datum(0.5))
    return alt.layer(chance, *_reference("mia_auc", public), points, data=data
                     ).transform_calculate(epsilon_shown=_dodge("epsilon", 1.06, log=True), **calc
                                           ).properties(
        width=WIDTH, height=HEIGHT,
        title=alt.Title("Empirical privacy: calibrated membership attack (loss drop)",
                        subtitle=subtitle))


def empirical_epsilon_chart(runs: pd.DataFrame) -> alt.LayerChart:
    """Claimed against measured privacy: each DP run's theoretical ε (x) and the lower
    bound its one-run canary audit proves (y), with the line y = x ("claimed ε"): a
    point above it would contradict the accounting. Non-private runs (ε = ∞) are
    labelled dashed rules at their bound; runs never audited are left out. Methods are
    drawn slightly apart along x (by 0.1: identical bounds, e.g. DP-SGD at C = R and
    Automatic Clipping, would hide each other); tooltips show the true ε."""
    data = _run_fields(runs, "epsilon_lower_bound")
    data = data[(data["method"] == "non_dp") | (data["epsilon"] > 0)].copy()
    data["audit_canaries"] = pd.to_numeric(runs.get("audit_canaries"), errors="coerce")
    top = 1.05 * float(np.nanmax([*data["epsilon"].where(data["method"] != "non_dp"),
                                  *data["epsilon_lower_bound"], 1.0]))
    label = "B-scan-level ε lower bound (audit, 95 %)"
    calc, tips, public = _tips(data, "epsilon_lower_bound", ("audit_canaries",))
    x = alt.X("epsilon:Q", title="B-scan-level ε (theoretical)", axis=alt.Axis(format=NUMBER))
    claimed = alt.Chart(pd.DataFrame({"epsilon": [0.0, top], "epsilon_lower_bound": [0.0, top],
                                      "text": ["", "claimed ε"]})).encode(
        x=x, y="epsilon_lower_bound:Q")
    diagonal = [claimed.mark_line(color="#999999", strokeDash=[4, 3]),
                claimed.mark_text(align="right", baseline="bottom", dx=-8, fontSize=11,
                                  color="#555555").encode(text="text:N")]
    shown = alt.X("epsilon_shown:Q", title="B-scan-level ε (theoretical)",
                  axis=alt.Axis(format=NUMBER))
    points = _points(shown, "epsilon_lower_bound", label, tips).transform_filter(
        alt.datum.method != "non_dp").transform_calculate(
        epsilon_shown=_dodge("epsilon", 0.1, False))
    return alt.layer(*diagonal, *_reference("epsilon_lower_bound", public), points, data=data
                     ).transform_calculate(**calc).properties(
        width=WIDTH, height=HEIGHT,
        title=alt.Title("Empirical privacy: one-run canary audit",
                        subtitle="a point above the claimed-ε line would contradict ε"))


def curves_chart(history: pd.DataFrame, columns: list[str], title: str,
                 log_y: bool = False, runs=None) -> alt.LayerChart:
    """Per-epoch series of several runs overlaid: colour per run, dash per series.

    ``runs`` fixes the run colours (default: the runs in ``history``): give every chart
    of a page the same list and a run keeps its colour on all of them. Points sit on a
    layer of their own so a one-epoch run still shows and the dash legend keeps line
    symbols.
    """
    present = [c for c in columns if c in history.columns]
    ids = [c for c in ("run_id", "method", "model", "epoch") if c in history.columns]
    data = (history.melt(id_vars=ids, value_vars=present, var_name="series", value_name="value")
            .dropna(subset=["value"]) if present and "epoch" in ids
            else pd.DataFrame(columns=["run_id", "epoch", "series", "value"]))
    if log_y:
        data = data[data["value"] > 0]
    data["series"] = data["series"].map(column_title)
    last = int(data["epoch"].max()) if len(data) else 1
    calc, tips = _tooltip(data, (*ids, "series", "value"))
    domain = runs if runs is not None else history.get("run_id", pd.Series(dtype=str)).unique()
    base = alt.Chart(data).encode(
        x=alt.X("epoch:Q", title="epoch", axis=alt.Axis(
            format="d", values=list(range(1, last + 1)) if last <= 20 else alt.Undefined)),
        y=alt.Y("value:Q", title=title, axis=alt.Axis(format=NUMBER),
                scale=alt.Scale(type="log" if log_y else "linear", zero=False)),
        color=alt.Color("run_id:N", title="run", scale=run_scale(domain),
                        legend=alt.Legend(labelLimit=320)),
        tooltip=tips)
    dash = ({"strokeDash": alt.StrokeDash("series:N", title="series",
                                          legend=alt.Legend(symbolType="stroke"))}
            if len(present) > 1 else {})
    return alt.layer(base.mark_line().encode(**dash), base.mark_point(filled=True),
                     data=data).transform_calculate(**calc).properties(
        width=WIDTH, height=HEIGHT, title=title)


def epsilon_epochs_chart(history: pd.DataFrame, runs=None) -> alt.LayerChart:
    """How fast each DP run spends its budget: ε after every epoch (log)."""
    return curves_chart(history, ["epsilon"], "B-scan-level ε spent (log scale)", log_y=True,
                        runs=runs)


def dice_chart(dice: pd.DataFrame, names: dict | None = None) -> alt.LayerChart:
    """Per-class Dice bars (columns ``class``, ``dice``, ``run``: a short key such as
    "A") in the classes' colours, one bar per run side by side (the first run solid, the
    second faded, as the legend shows, with ``names[run]`` as its label), so the chart
    doubles as the mask legend. Every bar is labelled with its run and value: a Dice of 0
    reads "0" at the axis, a class in neither truth nor prediction (Dice undefined) reads
    "absent" and has no bar."""
    data = dice.assign(label=[f"{run} " + ("absent" if pd.isna(v) else f"{v:.2f}" if v else "0")
                              for run, v in zip(dice["run"], dice["dice"])])
    runs = list(dict.fromkeys(data["run"]))
    names = names or {}
    y = alt.Y("class:N", sort=list(CLASS_NAMES), title=None)
    offset = alt.YOffset("run:N", sort=runs)
    bars = alt.Chart().mark_bar().encode(
        y=y, yOffset=offset,
        x=alt.X("dice:Q", title="Dice on this B-scan", scale=alt.Scale(domain=[0, 1.15]),
                axis=alt.Axis(values=[0, 0.25, 0.5, 0.75, 1], format=NUMBER)),
        color=alt.Color("class:N", scale=CLASS_SCALE, legend=None),
        opacity=alt.Opacity("run:N", sort=runs, title="bars",
                            scale=alt.Scale(domain=runs, range=[1.0, 0.4][:len(runs)]),
                            legend=alt.Legend(labelExpr=_names_expr("label", names),
                                              labelLimit=420, orient="bottom",
                                              direction="vertical", symbolType="square",
                                              symbolFillColor="#4c4c4c")),
        tooltip=[alt.Tooltip("run:N"), alt.Tooltip("class:N"),
                 alt.Tooltip("label:N", title="Dice")])
    labels = alt.Chart().mark_text(align="left", dx=3, fontSize=10).encode(
        y=y, yOffset=offset, x="shown:Q", text="label:N",
        color=alt.condition(alt.expr.isValid(alt.datum.dice), alt.value("#222222"),
                            alt.value("#888888")),
    ).transform_calculate(shown="isValid(datum.dice) ? datum.dice : 0")
    return alt.layer(bars, labels, data=data).properties(width=WIDTH, title="Per-class Dice")


def comparison_chart(charts: list[alt.TopLevelMixin], title: str) -> alt.VConcatChart:
    """Several charts stacked into one figure for a single PNG/PDF export."""
    return alt.vconcat(*charts, title=title).resolve_scale(color="independent",
                                                          shape="independent")


# --- masks -----------------------------------------------------------------------------

def colourise(labels: np.ndarray, where: np.ndarray | None = None,
              fill=AGREE_COLOUR) -> np.ndarray:
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
