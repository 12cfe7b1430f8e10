"""Study results: the committed reference results (``results/``), on the first open too.

These are the study's own runs on its development machine, not the runs of the store
the rest of the app shows; each report comes with the commands that produced it.
"""

import streamlit as st

from dpstudy.errors import DPStudyError
from dpstudy.reference import DEFAULT_RESULTS, load_reports
from dpstudy.ui import OVERVIEW_PAGE, runs, show_report, store

st.title("Study results")
folder = st.sidebar.text_input("results folder", str(DEFAULT_RESULTS), key="results_folder",
                               help="a folder of `dpstudy report` outputs (report.md, "
                                    "tables, figures); results/index.toml orders and titles "
                                    "them")
try:
    reports = load_reports(folder)
except DPStudyError as exc:
    st.error(str(exc))
    st.stop()
if not reports:
    st.warning(f"{folder} holds no report.md: make one with `dpstudy report RUNS_DIR --out "
               f"{folder}`.")
    st.stop()

n = int((runs()["status"] == "completed").sum()) if len(runs()) else 0
st.info(f"**Committed reference results**: the study's own runs (Duke data, 2-core CPU), "
        f"shipped in `{folder}` and reproduced with the commands shown with each report. "
        f"They are not the runs of your store (`{store().root}`, {n} completed), which the "
        f"other pages show.")
st.page_link(OVERVIEW_PAGE, label="Your own runs: Overview")
choice = st.radio("report", range(len(reports)), key="report", horizontal=True,
                  format_func=lambda i: reports[i].title.split(" (")[0])
st.header(reports[choice].title)
show_report(reports[choice])
