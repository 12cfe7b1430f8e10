"""Curves: per-epoch training dynamics of any set of runs, overlaid, plus one-file export.

A run keeps its colour on every chart of the page and in the export (a ``?runs=`` link
from the Launch page preselects listed runs).
"""

import streamlit as st

from dpstudy import plots
from dpstudy.ui import PDF, PNG, chart_block, downloads, histories, no_runs, runs

st.title("Training curves")
df = runs()
readable = df[df["status"] != "broken"].sort_values("updated", ascending=False)
if readable.empty:
    no_runs("No run has a history yet.")
    st.stop()

listed = list(readable["run_id"])
wanted = [r for r in st.query_params.get("runs", "").split(",") if r in listed]
chosen = st.multiselect("runs", listed, default=wanted or listed[:6], key="curve_runs")
if not chosen:
    st.info("Choose runs to overlay.")
    st.stop()
history = histories(chosen)
st.caption("ε is B-scan-level. For DP runs the training loss, the gradient-norm median and "
           "the clipped fraction are computed from private training data without noise: "
           "diagnostics, not covered by ε (and left out of the reports' tables). Automatic "
           "Clipping rescales every gradient, so it has no clipped fraction.")
charts = {title: plots.curves_chart(history, columns, title, runs=chosen)
          for title, columns in plots.CURVES.items()}
for title, chart in charts.items():
    chart_block(chart, "curves_" + title.replace(" ", "_").replace("ε", "epsilon"))

st.subheader("Export this comparison")
st.caption("The frontier of the chosen runs that completed and all curves above, as one figure.")
selection = readable[readable["run_id"].isin(chosen) & (readable["status"] == "completed")]
figure = plots.comparison_chart([plots.frontier_chart(selection), *charts.values()],
                                title="dpstudy comparison")
downloads(figure, "comparison", (PNG, PDF))
