"""Masks: one validation B-scan with its ground truth and one or two runs' predictions.

Runs are chosen from the store's listing only, so nothing typed here becomes a path.
"""

import numpy as np
import pandas as pd
import streamlit as st

from dpstudy import plots
from dpstudy.classes import CLASS_COLOURS, CLASS_NAMES
from dpstudy.errors import StoreError
from dpstudy.metrics import dice_per_class
from dpstudy.ui import chart_block, no_runs, page_config, predictions, runs

NONE = "(none)"
LEGEND = " &nbsp; ".join(
    f'<span style="display:inline-block;width:0.9em;height:0.9em;vertical-align:middle;'
    f'background:rgb{rgb};border:1px solid #888"></span> {name}'
    for name, rgb in zip(CLASS_NAMES[1:], CLASS_COLOURS[1:]))


def _label(row) -> str:
    eps = "non-private" if pd.isna(row.epsilon) else f"ε = {row.epsilon:.3g}"
    return f"{row.run_id} ({eps})"


def _image(col, array, caption: str) -> None:
    col.image(array, caption=caption, output_format="PNG", width="stretch")


page_config("Masks")
st.title("Masks")
df = runs()
done = df[df["status"] == "completed"]
if done.empty:
    no_runs("No completed run yet: predictions are saved when a run completes.")
    st.stop()

labels = {row.run_id: _label(row) for row in done.itertuples()}
col_a, col_b = st.columns(2)
run_a = col_a.selectbox("run", list(labels), format_func=labels.get, key="run_a")
run_b = col_b.selectbox("compare with", [NONE, *(r for r in labels if r != run_a)],
                        format_func=lambda r: labels.get(r, r), key="run_b")
try:
    preds_a = predictions(run_a)
    preds_b = predictions(run_b) if run_b != NONE else None
except StoreError as exc:
    st.error(str(exc))
    st.stop()

names = sorted(preds_a if preds_b is None else set(preds_a) & set(preds_b))
if not names:
    st.warning("These runs share no validation B-scan: they were trained on different data.")
    st.stop()
scan = st.selectbox("validation B-scan", names, key="scan")
only_errors = st.toggle("show only where prediction and truth disagree", key="only_errors")

image, truth = preds_a[scan]["image"], preds_a[scan]["mask"]
preds = {run_a: preds_a[scan]["pred"]}
if preds_b is not None:
    preds[run_b] = preds_b[scan]["pred"]
    if not np.array_equal(preds_b[scan]["mask"], truth):
        st.warning("Same B-scan name, different ground truth: the runs used different data.")
wrong = {run_id: pred != truth for run_id, pred in preds.items()}
suffix = " (disagreements only)" if only_errors else ""

st.markdown(LEGEND, unsafe_allow_html=True)
cols = st.columns(2 + len(preds))
_image(cols[0], image, "OCT B-scan")
_image(cols[1], plots.colourise(truth), "ground truth")
for col, (run_id, pred) in zip(cols[2:], preds.items()):
    _image(col, plots.colourise(pred, wrong[run_id] if only_errors else None),
           f"prediction{suffix}: {run_id} — {wrong[run_id].mean():.1%} of pixels wrong")

cols = st.columns(2 + len(preds))
_image(cols[1], plots.overlay(image, truth), "ground truth over the B-scan")
for col, (run_id, pred) in zip(cols[2:], preds.items()):
    _image(col, plots.overlay(image, pred, wrong[run_id] if only_errors else None),
           f"prediction over the B-scan{suffix}: {run_id}")

dice = pd.DataFrame([{"run": run_id, "class": name, "dice": value}
                     for run_id, pred in preds.items()
                     for name, value in zip(CLASS_NAMES, dice_per_class(pred, truth))])
chart_block(plots.dice_chart(dice), f"dice_{scan}")
st.caption("No bar: the class is in neither the truth nor the prediction (Dice undefined).")
