"""The tuning landscape: utility over (clipping setting × learning rate) per method and
optimiser, at one privacy budget.

How much tuning a method needs is the width of its good region, not its best cell: a
heat map per method and optimiser shows both. The cells come from the run store as they
are — a run that diverged or failed is a cell marked as such, never dropped, because
"this learning rate breaks it" is part of the answer.
"""

from __future__ import annotations

import dataclasses

import altair as alt
import numpy as np
import pandas as pd

from .config import DEFAULT_LR, HASH_EXCLUDED, RunConfig
from .plots import METHOD_NAMES, differing_columns, metric_label, setting_value

#: What each method's second axis is (besides the learning rate).
AXIS_TITLE = "clipping setting"
#: Run settings a cell is keyed by (or, the seed, averaged over); the spelling of the data
#: path is not a setting (its fingerprint is).
AXES = ("method", "optimizer", "lr", "max_grad_norm", "gamma", "final_rate", "clip_fn",
        "clipping", "seed", "data")
#: Settings left out of a row label where the other differing settings determine them.
IMPLIED = ("init_from", "noise_multiplier")
#: How a setting is named in a row label, where not by its name.
NAMES = {"target_epsilon": "ε", "noise_multiplier": "σ"}


def _apart(runs: pd.DataFrame) -> list[str]:
    """The run settings outside the landscape's axes in which ``runs`` differ (e.g. the
    parameters trained): each goes into the row label, so that no cell averages two
    configurations into a value that is neither's."""
    fields = [f.name for f in dataclasses.fields(RunConfig)
              if f.name not in AXES + HASH_EXCLUDED] + ["data_fingerprint"]
    apart = differing_columns(runs, fields)
    for implied in IMPLIED:    # said by the others: a run id, the σ of a target ε
        others = [f for f in apart if f != implied]
        if implied in apart and others and runs.astype({f: str for f in apart}).groupby(
                others)[implied].nunique().max() == 1:
            apart = others
    return apart


def _axis_value(row, apart: list[str]) -> str:
    """The row label of a cell: C for Abadi clipping, r* (and the clip function under
    it) for Random Sparsification, γ for Automatic Clipping; per-layer clipping is a
    row of its own, and so is each value of a setting in ``apart``."""
    if row["method"] == "dp_sgd":
        label = f"C = {row['max_grad_norm']:g}"
    elif row["method"] == "random_sparsification":
        under = "Abadi, C = %g" % row["max_grad_norm"] if row["clip_fn"] == "abadi" \
            else "Automatic"
        label = f"r* = {row['final_rate']:g} ({under})"
    else:
        label = f"γ = {row['gamma']:g}"
    label += ", per layer" if row.get("clipping") == "per_layer" else ""
    return "".join([label, *(f", {NAMES.get(f, f.replace('_', ' '))} "
                             f"{setting_value(row[f]) or 'unset'}" for f in apart)])


def landscape_cells(runs: pd.DataFrame, metric: str = "val_dice_fg_mean") -> pd.DataFrame:
    """One row per (method, optimiser, setting, learning rate) cell of the private runs
    of a ``list_runs()`` table: the metric's mean over completed seeds, how many seeds,
    and the cell's state (``ok``, ``diverged`` or ``failed``: no seed completed). Where
    the runs differ in another setting too, the setting says which value."""
    cols = ["method", "method_name", "optimizer", "setting", "lr", "lr_label", metric,
            "n_seeds", "state", "run_ids"]
    if runs.empty or "method" not in runs:
        return pd.DataFrame(columns=cols)
    runs = runs[runs["method"].ne("non_dp") & runs["status"].isin(["completed", "failed"])]
    if runs.empty:
        return pd.DataFrame(columns=cols)
    default = [DEFAULT_LR[(m, o)] for m, o in zip(runs["method"], runs["optimizer"])]
    apart = _apart(runs)
    runs = runs.assign(setting=runs.apply(_axis_value, axis=1, apart=apart),
                       lr=pd.to_numeric(runs["lr"], errors="coerce").fillna(
                           pd.Series(default, index=runs.index)))
    cells = []
    for (method, opt, setting, lr), g in runs.groupby(
            ["method", "optimizer", "setting", "lr"], sort=True):
        done = g[g["status"] == "completed"]
        errors = " ".join(g["error"].fillna("").astype(str)) if "error" in g else ""
        state = ("ok" if len(done) else "diverged" if "diverged" in errors else "failed")
        value = pd.to_numeric(done[metric], errors="coerce").mean() if len(done) else np.nan
        cells.append({"method": method, "method_name": METHOD_NAMES.get(method, method),
                      "optimizer": opt, "setting": setting, "lr": lr, "lr_label": f"{lr:g}",
                      metric: value, "n_seeds": len(done), "state": state,
                      "run_ids": " ".join(g["run_id"])})
    return pd.DataFrame(cells, columns=cols)


#: The colour scale spans the best cell's value and this much below it (in the metric's
#: units); worse cells saturate. Near the optimum differences of 0.01 Dice matter, and a
#: scale down to a diverged 0 would paint the whole good region one colour.
COLOUR_SPAN = 0.05


def landscape_chart(cells: pd.DataFrame, metric: str = "val_dice_fg_mean") -> alt.FacetChart:
    """Heat maps, one per method (rows) and optimiser (columns): colour = the metric
    (over the top :data:`COLOUR_SPAN` below the best cell), each cell annotated with its
    value, or 'diverged' / 'failed' on grey."""
    label = metric_label(metric)
    data = cells.assign(text=[f"{v:.3f}" if s == "ok" else s
                              for v, s in zip(cells[metric], cells["state"])])
    best = float(data[metric].max()) if data[metric].notna().any() else 1.0
    order = sorted(data["lr"].dropna().unique())
    base = alt.Chart().encode(
        x=alt.X("lr_label:O", title="learning rate", sort=[f"{v:g}" for v in order]),
        # untitled: the renderer places a title over labels as long as these can be
        y=alt.Y("setting:N", title=None, axis=alt.Axis(labelLimit=420)))
    heat = base.mark_rect().encode(
        color=alt.condition(alt.datum.state == "ok",
                            alt.Color(f"{metric}:Q", title=label,
                                      scale=alt.Scale(scheme="viridis", clamp=True,
                                                      domain=[best - COLOUR_SPAN, best])),
                            alt.value("#d9d9d9")),
        tooltip=[alt.Tooltip("method_name:N", title="method"),
                 alt.Tooltip("optimizer:N", title="optimiser"),
                 alt.Tooltip("setting:N", title=AXIS_TITLE),
                 alt.Tooltip("lr_label:N", title="learning rate"),
                 alt.Tooltip(f"{metric}:Q", title=label, format=".3f"),
                 alt.Tooltip("n_seeds:Q", title="seeds"),
                 alt.Tooltip("state:N", title="state")])
    light = (alt.datum.state != "ok") | (alt.datum[metric] > best - COLOUR_SPAN / 3)
    text = base.mark_text(fontSize=10).encode(
        text="text:N", color=alt.condition(light, alt.value("black"), alt.value("white")))
    return alt.layer(heat, text, data=data).properties(width=220, height=110).facet(
        row=alt.Row("method_name:N", title=None),
        column=alt.Column("optimizer:N", title="optimiser"),
    ).resolve_scale(x="independent", y="independent").properties(
        title=alt.Title(
            f"Tuning landscape: {label} per cell (mean over seeds; ε is B-scan-level)",
            subtitle=f"rows: {AXIS_TITLE}, and any other setting the runs differ in (e.g. "
                     f"the ε); colour over the best cell's {COLOUR_SPAN:g} below it; worse "
                     f"cells saturate"))


def best_cells(cells: pd.DataFrame, metric: str = "val_dice_fg_mean") -> pd.DataFrame:
    """Each (method, optimiser)'s best cell, and how much one learning-rate grid step off
    it loses (the worse of its neighbours on its row, a diverged or failed one counting
    as 0): the width of the good region, in the metric's units."""
    rows = []
    for (method, opt), g in cells[cells["state"] == "ok"].groupby(["method", "optimizer"]):
        best = g.loc[g[metric].idxmax()]
        line = cells[(cells["method"] == method) & (cells["optimizer"] == opt)
                     & (cells["setting"] == best["setting"])].sort_values("lr")
        i = list(line["lr"]).index(best["lr"])
        neighbours = [line.iloc[j] for j in (i - 1, i + 1) if 0 <= j < len(line)]
        values = [n[metric] if n["state"] == "ok" else 0.0 for n in neighbours]
        rows.append({"method": method, "optimizer": opt, "setting": best["setting"],
                     "lr": best["lr"], metric: best[metric],
                     "loss_one_step_off": (best[metric] - min(values)) if values else np.nan})
    return pd.DataFrame(rows)
