"""Masks: one validation B-scan with its ground truth and one or two runs' predictions.

Runs are chosen from the store's listing only, so nothing typed here becomes a path (a
``?run=`` link from the Launch page preselects a listed run).
"""

import numpy as np
import pandas as pd
import streamlit as st

from dpstudy import plots
from dpstudy.classes import CLASS_COLOURS, CLASS_NAMES
from dpstudy.errors import StoreError
from dpstudy.metrics import dice_per_class
from dpstudy.ui import chart_block, no_runs, predictions, runs

NONE = "(none)"
SWATCH = ('<span style="display:inline-block;width:0.9em;height:0.9em;vertical-align:middle;'
          'background:rgb{};border:1px solid #888"></span> {}')


def legend(only_errors: bool) -> str:
    """The colours of the mask views, background included; with the disagreement view,
    what the agreeing pixels look like."""
    items = [SWATCH.format(rgb, name) for name, rgb in zip(CLASS_NAMES, CLASS_COLOURS)]
    if only_errors:
        items.append(SWATCH.format(plots.AGREE_COLOUR, f"agrees with the truth "
                                   f"({plots.AGREE_NAME}; the B-scan shows through in the "
                                   f"overlays)"))
    return " &nbsp; ".join(items)


def _label(row) -> str:
    eps = "non-private" if pd.isna(row.epsilon) else f"B-scan-level ε = {row.epsilon:.3g}"
    return f"{row.run_id} ({eps})"


def _image(col, array, caption: str) -> None:
    col.image(array, caption=caption, output_format="PNG", width="stretch")


st.title("Masks")
df = runs()
done = df[df["status"] == "completed"]
if done.empty:
    no_runs("No completed run yet: predictions are saved when a run completes.")
    st.stop()

labels = {row.run_id: _label(row) for row in done.itertuples()}
wanted = st.query_params.get("run")
col_a, col_b = st.columns(2)
run_a = col_a.selectbox("run A", list(labels), format_func=labels.get, key="run_a",
                        index=list(labels).index(wanted) if wanted in labels else 0)
run_b = col_b.selectbox("compare with run B", [NONE, *(r for r in labels if r != run_a)],
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
preds = {"A": (run_a, preds_a[scan]["pred"])}
if preds_b is not None:
    preds["B"] = (run_b, preds_b[scan]["pred"])
    if not np.array_equal(preds_b[scan]["mask"], truth):
        st.warning("Same B-scan name, different ground truth: the runs used different data.")
wrong = {key: pred != truth for key, (_, pred) in preds.items()}
suffix = " (disagreements only)" if only_errors else ""

st.markdown(legend(only_errors), unsafe_allow_html=True)
cols = st.columns(2 + len(preds))
_image(cols[0], image, "OCT B-scan")
_image(cols[1], plots.colourise(truth), "ground truth")
for col, (key, (run_id, pred)) in zip(cols[2:], preds.items()):
    _image(col, plots.colourise(pred, wrong[key] if only_errors else None),
           f"{key}: prediction{suffix}: {run_id} — {wrong[key].mean():.1%} of pixels wrong")

cols = st.columns(2 + len(preds))
_image(cols[1], plots.overlay(image, truth), "ground truth over the B-scan")
for col, (key, (run_id, pred)) in zip(cols[2:], preds.items()):
    _image(col, plots.overlay(image, pred, wrong[key] if only_errors else None),
           f"{key}: prediction over the B-scan{suffix}: {run_id}")

dice = pd.DataFrame([{"run": key, "class": name, "dice": value}
                     for key, (_, pred) in preds.items()
                     for name, value in zip(CLASS_NAMES, dice_per_class(pred, truth))])
chart_block(plots.dice_chart(dice, {key: f"{key}: {run_id}" for key, (run_id, _) in
                                    preds.items()}), f"dice_{scan}")
st.caption("Bars: run A solid, run B faded, as in the legend; each is labelled with its "
           "run's letter and Dice. **0**: the class is in the truth or the prediction but "
           "they do not overlap. **absent**: the class is in neither, so Dice is undefined "
           "(no bar).")
