"""Shared Streamlit widgets/caching for the pages (``streamlit_app.py`` and ``pages/``).

Every page calls :func:`page_config` first and reads the run store only through this
module. Reads are cached with ``st.cache_data`` keyed on a store signature (the mtimes
of each run's files: one directory scan and a few ``stat`` calls), so a rerun costs
almost nothing and anything a trainer writes invalidates the cache. ``running`` is
re-checked on every call: a killed trainer changes no file, it only releases its lock.

It lives in the library, not in ``pages/``, because Streamlit's folder-based navigation
would list any script there as a page.
"""

from __future__ import annotations

import os
from functools import partial
from pathlib import Path

import pandas as pd
import streamlit as st

from dpstudy import plots
from dpstudy.errors import StoreError
from dpstudy.store import (CONFIG, HISTORY, PREDICTIONS, RUN_ID_RE, RunStore,
                           read_predictions)

#: Columns the pages rely on, present even when every run in the store is broken.
COLUMNS = ("run_id", "status", "error", "model", "method", "noise_multiplier",
           "max_grad_norm", "clipping", "epsilon", "val_dice_fg_mean", "val_dice_all_mean",
           "duration_s", "epochs", "epochs_done", "train_loss", "data_kind",
           "data_fingerprint", "data_description", "updated", "mia_auc", "mia_same_subjects")
PNG = ("png", plots.chart_to_png, "image/png")
SVG = ("svg", plots.chart_to_svg, "image/svg+xml")
CSV = ("csv", plots.chart_to_csv, "text/csv")
PDF = ("pdf", plots.chart_to_pdf, "application/pdf")
#: The Launch page's script, relative to ``streamlit_app.py`` (URL ``/Launch``).
LAUNCH_PAGE = "pages/1_Launch.py"


def page_config(title: str | None = None) -> None:
    """Wide layout and the browser-tab title; the first call on every page (with
    folder-based pages nothing shared runs before a page, so each page sets it)."""
    st.set_page_config(page_title=f"{title} · dpstudy" if title else "dpstudy",
                       layout="wide")


def store() -> RunStore:
    """The store at ``$DPSTUDY_RUNS`` or ``runs/``, read afresh so tests can repoint it."""
    return RunStore()


def signature(root: Path) -> tuple:
    """``(run id, mtimes of its files)`` per run: changes whenever a trainer writes."""
    try:
        with os.scandir(root) as entries:
            names = sorted(e.name for e in entries if e.is_dir() and RUN_ID_RE.fullmatch(e.name))
    except OSError:
        return ()
    sig = []
    for name in names:
        mtimes = tuple(_mtime(root / name / f) for f in (CONFIG, HISTORY, PREDICTIONS))
        if mtimes[0]:  # no config.json: not a run (yet)
            sig.append((name, mtimes))
    return tuple(sig)


def _mtime(path: Path) -> int:
    try:
        return path.stat().st_mtime_ns
    except OSError:
        return 0


@st.cache_data(show_spinner=False, max_entries=8)
def _runs(root: str, sig: tuple) -> pd.DataFrame:
    df = RunStore(root).list_runs()
    return df.reindex(columns=list(dict.fromkeys((*COLUMNS, *df.columns))))


def runs() -> pd.DataFrame:
    """``list_runs()`` of the store, one row per run, with live ``running`` statuses."""
    s = store()
    df = _runs(str(s.root), signature(s.root))
    for i in df.index[df["status"] == "running"]:
        try:
            meta = s.read_meta(df.at[i, "run_id"])
            df.loc[i, ["status", "error"]] = [meta["status"], meta.get("error")]
        except StoreError as exc:
            df.loc[i, ["status", "error"]] = ["broken", str(exc)]
    return df


@st.cache_data(show_spinner=False, max_entries=16)
def _histories(root: str, sig: tuple) -> pd.DataFrame:
    s, frames = RunStore(root), []
    for run_id, _ in sig:
        try:
            history, cfg = s.read_history(run_id), s.read_meta(run_id)["config"]
        except StoreError:
            continue  # the run table already shows why
        frames.append(history.assign(run_id=run_id, method=cfg.get("method"),
                                     model=cfg.get("model")))
    return (pd.concat(frames, ignore_index=True) if frames
            else pd.DataFrame(columns=["run_id", "method", "model", "epoch"]))


def histories(run_ids) -> pd.DataFrame:
    """Per-epoch histories of ``run_ids`` stacked, with run_id, method and model columns."""
    s, wanted = store(), set(run_ids)
    return _histories(str(s.root), tuple(x for x in signature(s.root) if x[0] in wanted))


@st.cache_data(show_spinner=False, max_entries=4)
def _predictions(root: str, run_id: str, mtime: int) -> dict:
    return read_predictions(RunStore(root), run_id)


def predictions(run_id: str) -> dict:
    """Saved validation predictions of a run; ``StoreError`` if it has none."""
    s = store()
    try:
        mtime = (s.path(run_id) / PREDICTIONS).stat().st_mtime_ns
    except FileNotFoundError:
        mtime = 0  # read_predictions says what is missing
    return _predictions(str(s.root), run_id, mtime)


def downloads(chart, name: str, exports=(PNG, SVG, CSV)) -> None:
    """A row of download buttons; each file is converted only when its button is clicked."""
    for col, (fmt, convert, mime) in zip(st.columns([1] * len(exports) + [6]), exports):
        col.download_button(fmt.upper(), data=partial(convert, chart), file_name=f"{name}.{fmt}",
                            mime=mime, key=f"{name}-{fmt}", on_click="ignore")


def chart_block(chart, name: str) -> None:
    """The chart with its PNG, SVG and CSV downloads."""
    st.altair_chart(chart, width="stretch")
    downloads(chart, name)


def no_runs(message: str) -> None:
    """Explain an empty page and point to where runs come from."""
    st.info(f"{message} Start one from the **Launch** page, or from a terminal:\n\n"
            "`python -m dpstudy train --model unet --method dp_sgd --noise-multiplier 1 "
            f"--epochs 5 --runs-dir {store().root}`")
    st.page_link(LAUNCH_PAGE, label="Open the Launch page")


def data_filter(df: pd.DataFrame) -> pd.DataFrame:
    """Runs on one data source only: a frontier that mixes phantom (pretraining) runs with
    Duke runs compares numbers measured on different images. The default is the data
    source with the most runs."""
    if df.empty:
        return df
    counts = df["data"].value_counts()
    if len(counts) <= 1:
        return df
    choice = st.selectbox("data", list(counts.index), key="data_source",
                          format_func=lambda d: f"{d} ({counts[d]} runs)")
    return df[df["data"] == choice]
