"""Shared Streamlit widgets/caching for the app's pages (``app_pages/``).

:data:`PAGES` is the navigation ``streamlit_app.py`` builds; every page reads the run
store only through this module. Reads are cached with ``st.cache_data`` keyed on a store
signature (mtime, inode and size of each run's files: one directory scan and a few
``stat`` calls), so a rerun costs almost nothing and anything a trainer writes
invalidates the cache: files are replaced atomically, so every write is a new inode,
even one within the file system's timestamp granularity of the last. ``running`` is
re-checked on every call: a killed trainer changes no file, it only releases its lock.

It lives in the library, next to the code it shows, rather than among the page scripts.
"""

from __future__ import annotations

import os
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
import streamlit as st

from dpstudy import estimate, launcher, plots
from dpstudy.anchor import epsilon_zero_anchors
from dpstudy.cli import START_HINT
from dpstudy.data.duke import available_splits
from dpstudy.data.source import SYNTHETIC, SYNTHETIC_SIZES
from dpstudy.errors import DPStudyError, StoreError
from dpstudy.reference import Report
from dpstudy.store import (CONFIG, HISTORY, PREDICTIONS, RUN_ID_RE, RunStore,
                           read_predictions)

#: Columns the pages rely on, present even when every run in the store is broken.
COLUMNS = ("run_id", "status", "error", "model", "method", "noise_multiplier",
           "max_grad_norm", "clipping", "epsilon", "val_dice_fg_mean", "val_dice_all_mean",
           "duration_s", "epochs", "epochs_done", "train_loss", "data_kind",
           "data_fingerprint", "data_description", "updated", "mia_auc", "mia_same_subjects",
           "data", "base_width", "depth", "epsilon_lower_bound", "audit_canaries", "mia_auc_gain",
           "mia_verdict")
PNG = ("png", plots.chart_to_png, "image/png")
SVG = ("svg", plots.chart_to_svg, "image/svg+xml")
CSV = ("csv", plots.chart_to_csv, "text/csv")
PDF = ("pdf", plots.chart_to_pdf, "application/pdf")
#: The app's pages in navigation order: script (relative to ``streamlit_app.py``),
#: title, URL path. The first is the default page, at ``/``. The folder is not called
#: ``pages/``: Streamlit would then fall back to folder-based navigation.
PAGES = (("app_pages/overview.py", "Overview", ""),
         ("app_pages/study.py", "Study results", "study"),
         ("app_pages/launch.py", "Launch", "launch"),
         ("app_pages/masks.py", "Masks", "masks"),
         ("app_pages/frontier.py", "Frontier", "frontier"),
         ("app_pages/landscape.py", "Landscape", "landscape"),
         ("app_pages/curves.py", "Curves", "curves"))
(OVERVIEW_PAGE, STUDY_PAGE, LAUNCH_PAGE, MASKS_PAGE, FRONTIER_PAGE, LANDSCAPE_PAGE,
 CURVES_PAGE) = (p for p, _, _ in PAGES)


def store() -> RunStore:
    """The store at ``$DPSTUDY_RUNS`` or ``runs/``, read afresh so tests can repoint it."""
    return RunStore()


def signature(root: Path) -> tuple:
    """``(run id, stamps of its files)`` per run: changes whenever a trainer writes."""
    try:
        with os.scandir(root) as entries:
            names = sorted(e.name for e in entries if e.is_dir() and RUN_ID_RE.fullmatch(e.name))
    except OSError:
        return ()
    sig = []
    for name in names:
        stamps = tuple(_stamp(root / name / f) for f in (CONFIG, HISTORY, PREDICTIONS))
        if stamps[0]:  # no config.json: not a run (yet)
            sig.append((name, stamps))
    return tuple(sig)


def _stamp(path: Path) -> tuple[int, int, int] | None:
    """What changes when a file is written or replaced; None if there is none."""
    try:
        info = path.stat()
    except OSError:
        return None
    return info.st_mtime_ns, info.st_ino, info.st_size


@st.cache_data(show_spinner=False, max_entries=8)
def _runs(root: str, sig: tuple) -> pd.DataFrame:
    df = RunStore(root).list_runs()
    return df.reindex(columns=list(dict.fromkeys((*COLUMNS, *df.columns))))


@st.cache_data(show_spinner="Scoring the public pretraining on the validation split "
                             "(the ε = 0 anchor)…", max_entries=8)
def _anchors(root: str, sig: tuple, rows: pd.DataFrame, metric: str) -> pd.DataFrame:
    return epsilon_zero_anchors(RunStore(root), rows, metric)


def anchors(df: pd.DataFrame, metric: str) -> pd.DataFrame:
    """The ε = 0 anchors of the DP runs in ``df`` (:mod:`dpstudy.anchor`), cached until a
    run's files change."""
    s = store()
    cols = [c for c in ("run_id", "method", "model", "init_from", "data", "limit") if c in df]
    return _anchors(str(s.root), signature(s.root), df[cols], metric)


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
def _predictions(root: str, run_id: str, stamp) -> dict:
    return read_predictions(RunStore(root), run_id)


def predictions(run_id: str) -> dict:
    """Saved validation predictions of a run; ``StoreError`` if it has none."""
    s = store()
    return _predictions(str(s.root), run_id, _stamp(s.path(run_id) / PREDICTIONS))


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
            f"`{START_HINT} --runs-dir {store().root}`")
    st.page_link(LAUNCH_PAGE, label="Open the Launch page")


@st.cache_data(show_spinner=False, max_entries=4)
def _estimator(root: str, sig: tuple) -> estimate.Estimator:
    return estimate.calibrate_store(RunStore(root))


def estimator() -> estimate.Estimator:
    """Run-time estimates calibrated on this store's completed runs."""
    s = store()
    return _estimator(str(s.root), signature(s.root))


def show_report(report: Report) -> None:
    """A committed report: what it is, the commands that made it, its text and figures."""
    if report.summary:
        st.markdown(report.summary)
    if report.commands:
        st.caption("Reproduced with:")
        st.code("\n".join(report.commands), language="bash")
    else:
        st.caption("The commands that made this report are not recorded in results/index.toml.")
    for kind, block in report.blocks:
        if kind == "figure":
            show_figure(block)
        else:
            st.markdown(block)


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


#: Overview columns by importance, with their titles: these fit 1400 px ...
OVERVIEW_MAIN = {"status": "status", "method": "method", "model": "model",
                 "epsilon": "B-scan-level ε",
                 "epsilon_lower_bound": "ε lower bound (audit, 95 %)",
                 "mia_auc_gain": "MIA AUC gain", "val_dice_fg_mean": "Dice (foreground)",
                 "epochs_done": "epochs", "duration_s": "duration", "run_id": "run"}
#: Audit results: shown only once a run of the table has one (else a column of "–" would
#: cost the width that keeps status, epochs and duration in view).
AUDIT_COLUMNS = ("epsilon_lower_bound", "mia_auc_gain", "mia_verdict")
#: ... and these come with "all columns".
OVERVIEW_MORE = {"noise_multiplier": "noise σ", "max_grad_norm": "clipping bound C",
                 "val_dice_all_mean": "Dice (all classes)", "mia_auc": "membership AUC",
                 "mia_verdict": "membership audit verdict",
                 "seed": "seed", "data_kind": "data", "updated": "last update"}
#: Overview columns shown as they are (every other one is a number).
TEXT_COLUMNS = ["status", "method", "model", "run_id", "data_kind", "mia_verdict"]
MISSING = "–"


def duration(seconds) -> str:
    """``"3 min 20 s"``."""
    if pd.isna(seconds):
        return MISSING
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return (f"{hours} h {minutes} min" if hours else f"{minutes} min {secs} s" if minutes
            else f"{secs} s")


def overview_table(df: pd.DataFrame, all_columns: bool = False):
    """The Overview's run table, for people: human column titles and method and model
    names, "∞" as the ε and nothing as σ and C of a non-private run, "3 of 10" epochs for
    an unfinished run (show it with ``placeholder=MISSING``: Streamlit draws a missing
    value as its placeholder, whatever the Styler says). Values stay numbers underneath
    (a pandas Styler), so columns sort as numbers: a non-private run's ε is infinite and
    its σ 0."""
    cols = {k: v for k, v in {**OVERVIEW_MAIN, **(OVERVIEW_MORE if all_columns else {})}.items()
            if k not in AUDIT_COLUMNS or df.get(k, pd.Series()).notna().any()}
    table = df.reindex(columns=list(cols)).reset_index(drop=True)
    for col in table.columns.difference(TEXT_COLUMNS):
        table[col] = pd.to_numeric(table[col], errors="coerce")
    if "updated" in table:
        table["updated"] = pd.to_datetime(table["updated"], unit="s")
    public = (df["method"] == "non_dp").to_numpy()
    table.loc[public, "epsilon"] = np.inf
    if "noise_multiplier" in table:
        table.loc[public, "noise_multiplier"] = 0.0
    formats = {"method": lambda v: plots.METHOD_NAMES.get(v, v),
               "model": lambda v: plots.MODEL_NAMES.get(v, v),
               "epsilon": "{:.3g}", "epsilon_lower_bound": "{:.3g}", "mia_auc_gain": "{:+.3f}",
               "noise_multiplier": "{:.3g}", "max_grad_norm": "{:.3g}",
               "val_dice_fg_mean": "{:.3f}", "val_dice_all_mean": "{:.3f}",
               "mia_auc": "{:.3f}", "epochs_done": "{:.0f}", "seed": "{:.0f}",
               "duration_s": duration, "updated": "{:%Y-%m-%d %H:%M}"}
    total = pd.to_numeric(df["epochs"], errors="coerce").to_numpy()
    unfinished = (table["epochs_done"] < total).to_numpy()
    table = table.rename(columns=cols)
    styler = table.style.format({cols[k]: v for k, v in formats.items() if k in cols},
                                na_rep=MISSING)
    styler = styler.format("∞", subset=(public, [cols["epsilon"]]))
    blank = [cols[c] for c in ("noise_multiplier", "max_grad_norm") if c in cols]
    if blank:
        styler = styler.format("", subset=(public, blank))
    for n in set(total[unfinished]):
        styler = styler.format(lambda v, n=n: f"{v:.0f} of {n:.0f}",
                               subset=(unfinished & (total == n), [cols["epochs_done"]]))
    return styler


def splits_of(data: str) -> list[str]:
    """The splits a run's data offers (for evaluation on another one)."""
    if data == SYNTHETIC:
        return list(SYNTHETIC_SIZES)
    try:
        return available_splits(data)
    except DPStudyError:
        return []


def run_actions(run_id: str, data: str, key: str) -> None:
    """Buttons that start the membership audit of a completed run, or its evaluation on
    another split, as separate processes (``dpstudy audit|evaluate``)."""
    audit, split, evaluate = st.columns([2, 1, 2], vertical_alignment="bottom")
    started = None
    if audit.button("Membership audit", key=f"{key}-audit-{run_id}",
                    help="dpstudy audit RUN: a calibrated membership-inference attack (each image's "
                         "loss drop from the starting weights)"):
        started = launcher.launch(["audit", run_id], store().root,
                                  label=f"Membership audit of {run_id}")
    splits = splits_of(data)
    chosen = split.selectbox("split", splits, index=splits.index("test") if "test" in splits
                             else 0, key=f"{key}-split-{run_id}")
    if evaluate.button("Evaluate on this split", key=f"{key}-evaluate-{run_id}",
                       disabled=not splits, help="dpstudy evaluate RUN --split SPLIT"):
        started = launcher.launch(["evaluate", run_id, f"--split={chosen}"], store().root,
                                  label=f"Evaluation of {run_id} on its {chosen} split")
    if started:
        st.success(f"Started: {started['label']} (launch {started['id']}).")
        st.page_link(LAUNCH_PAGE, label="Follow it on the Launch page")


def show_figure(path: Path) -> None:
    st.image(str(path), caption=path.name)
