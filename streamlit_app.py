"""dpstudy's Streamlit app: ``streamlit run streamlit_app.py`` (or ``make app``).

This script is the Overview page (URL ``/``): every run in the store, filterable and
sortable, with what needs attention. The other pages are Streamlit's folder-based
multipage convention, ``pages/<n>_<Name>.py``, listed in the sidebar in that order under
``<Name>`` and served at ``/<Name>`` (case-sensitive):

* ``pages/1_Launch.py``   -> ``/Launch``:   start runs or grids, follow them, cancel them;
* ``pages/2_Masks.py``    -> ``/Masks``:    a B-scan, its truth and one or two predictions;
* ``pages/3_Frontier.py`` -> ``/Frontier``: privacy spent against utility;
* ``pages/4_Curves.py``   -> ``/Curves``:   per-epoch curves of chosen runs, and export.

No ``st.navigation``: mixing it with a ``pages/`` folder makes a fresh server whose first
request is a page URL fall back to folder-based navigation. Shared helpers live in
:mod:`dpstudy.ui` (a script in ``pages/`` would be listed as a page). Every page reads
the run store at ``$DPSTUDY_RUNS`` (default ``runs/``) through the library; Launch starts
trainings as separate processes. No page icons: Material icons would be fetched from
outside, and the app makes no network requests.
"""

import pandas as pd
import streamlit as st

from dpstudy.ui import no_runs, page_config, runs, store

STATUS_ORDER = ("running", "completed", "failed", "cancelled", "interrupted", "broken")
TABLE = {
    "run_id": st.column_config.TextColumn("run"),
    "model": "model", "method": "method",
    "noise_multiplier": st.column_config.NumberColumn("σ", format="%.3g"),
    "max_grad_norm": st.column_config.NumberColumn("C", format="%.3g"),
    "epsilon": st.column_config.NumberColumn("ε", format="%.3g"),
    "mia_auc": st.column_config.NumberColumn(
        "MIA AUC", format="%.3f", help="membership-inference audit (dpstudy audit): attack "
        "AUC, 0.5 = chance; see the Frontier page"),
    "val_dice_fg_mean": st.column_config.NumberColumn("Dice (fg mean)", format="%.4f"),
    "val_dice_all_mean": st.column_config.NumberColumn("Dice (all classes)", format="%.4f"),
    "status": "status",
    "epochs_done": st.column_config.NumberColumn("epochs done"),
    "duration_s": st.column_config.NumberColumn("duration (s)", format="%.1f"),
}


def _rank(status: str) -> int:
    return STATUS_ORDER.index(status) if status in STATUS_ORDER else len(STATUS_ORDER)


def _filtered(df: pd.DataFrame) -> pd.DataFrame:
    cols = st.columns(3)
    for col, field in zip(cols, ("model", "method", "status")):
        options = sorted(df[field].dropna().unique())
        chosen = col.multiselect(field, options, placeholder="all")
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


page_config()
st.title("Runs")
st.caption(f"Run store: `{store().root.resolve()}`")
df = runs()
if df.empty:
    no_runs("The run store is empty.")
    st.stop()

counts = df["status"].value_counts()
for col, status in zip(st.columns(len(counts)), sorted(counts.index, key=_rank)):
    col.metric(status, int(counts[status]))

shown = _filtered(df)
st.dataframe(shown, column_order=list(TABLE), column_config=TABLE, hide_index=True)

trouble = df[df["status"].isin(["failed", "interrupted", "broken", "cancelled"])]
if len(trouble):
    st.subheader("Runs that did not finish")
    st.dataframe(trouble[["run_id", "status", "error"]], hide_index=True)

st.subheader("Where the data came from")
sources = _data_sources(df)
if len(sources) > 1:
    st.warning("These runs were trained on different data; compare within one fingerprint.")
st.dataframe(sources, hide_index=True)
