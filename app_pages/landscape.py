"""Landscape: utility over (clipping setting × learning rate) per method and optimiser."""

import streamlit as st

from dpstudy import plots
from dpstudy.landscape import best_cells, landscape_cells, landscape_chart
from dpstudy.ui import CURVES_PAGE, MASKS_PAGE, chart_block, data_filter, no_runs, runs

st.title("Tuning landscape")
df = runs()
attempted = data_filter(df[df["status"].isin(["completed", "failed"])])
label = st.selectbox("utility metric", list(plots.UTILITY_METRICS), key="landscape_metric")
metric = plots.UTILITY_METRICS[label]
cells = landscape_cells(attempted, metric)
if cells.empty or cells.groupby(["method", "optimizer"])["lr"].nunique().max() < 2:
    no_runs("No learning-rate grid of DP runs yet: the landscape needs DP runs of one "
            "method and optimiser at two or more learning rates (the `landscape` profile: "
            "`dpstudy sweep --profile landscape`).")
    st.stop()

budgets = sorted(attempted.loc[attempted["method"] != "non_dp", "target_epsilon"].dropna()
                 .unique())
st.caption("One heat map per method (rows) and optimiser (columns); colour and label: the "
           "metric's mean over completed seeds; grey cells diverged or failed (no seed "
           "completed). Runs at different privacy budgets share a cell: compare at one "
           "B-scan-level ε" + (f" (this store: ε ∈ {{{', '.join(f'{e:g}' for e in budgets)}}})"
                               if budgets else "") + ".")
chart_block(landscape_chart(cells, metric), "landscape")

best = best_cells(cells, metric)
if len(best):
    st.subheader("How much tuning each method needs")
    st.caption("Each method and optimiser's best cell, and what one learning-rate grid "
               "step off it loses (a diverged neighbour counts as 0): a small loss is a "
               "wide good region.")
    st.dataframe(best.assign(
        method=best["method"].map(plots.METHOD_NAMES),
        lr=best["lr"].map(lambda v: f"{v:g}"),
        **{metric: best[metric].map(lambda v: f"{v:.3f}"),
           "loss_one_step_off": best["loss_one_step_off"].map(
               lambda v: "–" if v != v else f"{v:.3f}")}).rename(columns={
        "optimizer": "optimiser", "setting": "clipping setting", "lr": "learning rate",
        metric: label, "loss_one_step_off": "loss one step off"}), hide_index=True)

st.subheader("A cell's runs")
labels = {f"{r.method_name} · {r.optimizer} · {r.setting} · lr {r.lr_label} ({r.state})":
          r.run_ids.split() for r in cells.itertuples()}
chosen = labels[st.selectbox("cell", list(labels), key="landscape_cell")]
left, right = st.columns(2)
left.page_link(MASKS_PAGE, label="Masks of this cell's first run", query_params={"run": chosen[0]})
right.page_link(CURVES_PAGE, label="Curves of this cell's runs",
                query_params={"runs": ",".join(chosen)})
