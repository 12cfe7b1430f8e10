"""Curves: per-epoch training dynamics of any set of runs, overlaid, plus one-file export."""

import streamlit as st

from dpstudy import plots
from dpstudy.ui import PDF, PNG, chart_block, downloads, histories, no_runs, page_config, runs

page_config("Curves")
st.title("Training curves")
df = runs()
readable = df[df["status"] != "broken"].sort_values("updated", ascending=False)
if readable.empty:
    no_runs("No run has a history yet.")
    st.stop()

chosen = st.multiselect("runs", list(readable["run_id"]),
                        default=list(readable["run_id"].iloc[:6]), key="curve_runs")
if not chosen:
    st.info("Choose runs to overlay.")
    st.stop()
history = histories(chosen)
charts = {title: plots.curves_chart(history, columns, title)
          for title, columns in plots.CURVES.items()}
for title, chart in charts.items():
    chart_block(chart, "curves_" + title.replace(" ", "_").replace("ε", "epsilon"))

st.subheader("Export this comparison")
st.caption("The frontier of the chosen runs that completed and all curves above, as one figure.")
selection = readable[readable["run_id"].isin(chosen) & (readable["status"] == "completed")]
figure = plots.comparison_chart([plots.frontier_chart(selection), *charts.values()],
                                title="dpstudy comparison")
downloads(figure, "comparison", (PNG, PDF))
