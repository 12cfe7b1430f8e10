"""Overview: every run in the store, filterable and sortable, with what needs attention,
and the membership audit or an evaluation on another split for a completed run."""

import pandas as pd
import streamlit as st

from dpstudy import plots
from dpstudy.errors import DPStudyError
from dpstudy.reference import load_reports
from dpstudy.ui import (MISSING, STUDY_PAGE, no_runs, overview_table, run_actions, runs,
                        show_figure, store)

STATUS_ORDER = ("running", "completed", "failed", "cancelled", "interrupted", "broken")
FILTERS = {"model": plots.MODEL_NAMES, "method": plots.METHOD_NAMES, "status": {}}


def _rank(status: str) -> int:
    return STATUS_ORDER.index(status) if status in STATUS_ORDER else len(STATUS_ORDER)


def _filtered(df: pd.DataFrame) -> pd.DataFrame:
    for col, (field, names) in zip(st.columns(3), FILTERS.items()):
        options = sorted(df[field].dropna().unique())
        chosen = col.multiselect(field, options, placeholder="all", key=f"filter_{field}",
                                 format_func=lambda v, names=names: names.get(v, v))
        if chosen:
            df = df[df[field].isin(chosen)]
    return df


def _data_sources(df: pd.DataFrame) -> pd.DataFrame:
    """One row per distinct data set (fingerprint): results on different data never mix."""
    groups = (df[df["data_fingerprint"].notna()]
              .groupby(["data_kind", "data_fingerprint"])
              .agg(runs=("run_id", "size"), description=("data_description", "first"))
              .reset_index())
    return groups.rename(columns={"data_kind": "data", "data_fingerprint": "fingerprint"})


def _committed_results() -> None:
    """What the study found, from the committed results, for a store with nothing yet."""
    try:
        first = load_reports()[0]
    except (DPStudyError, IndexError):  # an installed package has no results/
        return
    with st.container(border=True):
        st.subheader("What the study found (committed reference results)")
        st.caption(f"Not your runs: {first.title}, from the study's own run store. "
                   f"Reproduced with `{first.commands[0] if first.commands else 'see results/'}`.")
        if first.figures:
            show_figure(first.figures[0])
        st.page_link(STUDY_PAGE, label="Every committed report on the Study results page")


st.title("Overview: your runs")
st.caption(f"Run store: `{store().root.resolve()}`")
df = runs()
if df.empty:
    no_runs("The run store is empty.")
    _committed_results()
    st.stop()

counts = df["status"].value_counts()
for col, status in zip(st.columns(len(counts)), sorted(counts.index, key=_rank)):
    col.metric(status, int(counts[status]))

shown = _filtered(df)
every = st.toggle("all columns", key="all_columns",
                  help="σ, C, all-class Dice, audit AUC, seed, data and last update")
st.dataframe(overview_table(shown, every), hide_index=True, placeholder=MISSING)
if shown[["epsilon_lower_bound", "mia_auc_gain"]].notna().any(axis=None):
    st.caption("ε and its lower bound are B-scan-level: they bound what the model reveals about "
               "one training B-scan. The lower bound comes from a one-run canary audit (95 % "
               "confidence); MIA AUC gain is the membership attack's AUC minus that of the "
               "starting weights — computed from the private training images without noise, "
               "an auditor's diagnostic not covered by ε. A lower bound far below ε means the attack found less than "
               "ε allows, not that ε is loose; one above ε would contradict the accounting.")

trouble = df[df["status"].isin(["failed", "interrupted", "broken", "cancelled"])]
if len(trouble):
    st.subheader("Runs that did not finish")
    st.dataframe(trouble[["run_id", "status", "error"]].rename(columns={"run_id": "run"}),
                 hide_index=True, placeholder=MISSING)

done = df[df["status"] == "completed"]
if len(done):
    st.subheader("Audit or evaluate a completed run")
    st.caption("Each starts as a separate process; follow it on the Launch page.")
    chosen = st.selectbox("run", list(done["run_id"]), key="action_run")
    run_actions(chosen, done.set_index("run_id").at[chosen, "data"], "overview")

st.subheader("Where the data came from")
sources = _data_sources(df)
if len(sources) > 1:
    st.warning("These runs were trained on different data; compare within one fingerprint.")
st.dataframe(sources, hide_index=True)
