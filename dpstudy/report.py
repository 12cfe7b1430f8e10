"""The study report: one folder of tables and figures from a run store.

A configuration is a run's full config minus its seed, so seeds are aggregated as a
mean and a spread (sample standard deviation). Only completed runs count; the others
are listed in the report with their status and error, never silently dropped.
Pretraining runs (the ``init_from`` of other runs) appear in the tables but not in
the figures, whose runs should all be trained and scored on the same data.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import altair as alt
import numpy as np
import pandas as pd

from . import plots
from .anchor import epsilon_zero_anchors
from .landscape import landscape_cells, landscape_chart
from .config import RunConfig
from .store import RunStore

#: What makes runs seeds of one configuration: the run config minus seed, with the data
#: identified by content (fingerprint), not by how its path was spelled on the command line.
CONFIG_COLUMNS = [*(f.name for f in dataclasses.fields(RunConfig) if f.name not in ("seed", "data")),
                  "data_fingerprint"]
#: Headline metrics: seed mean under the metric's own name, spread under the second.
SPREAD = {"val_dice_fg_mean": "val_dice_fg_std", "val_dice_all_mean": "val_dice_all_std",
          "mia_auc": "mia_auc_std", "mia_auc_gain": "mia_auc_gain_std",
          "epsilon_lower_bound": "epsilon_lower_bound_std"}
SUMMARY_FIRST = ["config", "model", "method", "noise_multiplier", "max_grad_norm",
                 "target_epsilon", "epsilon", "n_seeds", "val_dice_fg_mean", "val_dice_fg_std",
                 "val_dice_all_mean", "val_dice_all_std", "mia_auc", "mia_auc_std"]
#: Columns of the readable table, in order; each shown only where configurations differ
#: in it (model and method always).
TABLE_KEYS = ["model", "base_width", "depth", "image_size", "method", "noise_multiplier",
              "target_epsilon", "max_grad_norm", "pretrained", "epochs", "batch_size",
              "optimizer", "lr", "lr_schedule", "augment",
              "aug_multiplicity", "audit_holdout", "fluid_weight", "accountant", "normalisation",
              "trainable", "adapter_rank", "ema_decay", "tta", "privacy_unit", "data_kind"]


def completed_runs(runs: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(completed runs, every other run with its status and error)."""
    if runs.empty:
        return runs, runs
    done = runs["status"] == "completed"
    others = runs.loc[~done, [c for c in ("run_id", "status", "error") if c in runs]]
    return runs[done].copy(), others


def summarise(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per configuration of completed ``runs`` (a ``list_runs()`` table).

    ``noise_multiplier`` is the σ actually used (calibrated for ε-targeted runs), ``epsilon``
    the ε spent; ``config`` numbers the rows so figures and tables can refer to them.
    """
    if runs.empty:
        return pd.DataFrame(columns=list(dict.fromkeys(
            [*SUMMARY_FIRST, *CONFIG_COLUMNS, "data", "pretraining", "data_kind",
             "mia_reference_auc", "mia_same_subjects", "seeds", "run_ids"])))
    runs = runs.copy()
    for col in (*SPREAD, "epsilon", "mia_reference_auc"):
        runs[col] = pd.to_numeric(runs[col], errors="coerce") if col in runs else np.nan
    keys = [c for c in CONFIG_COLUMNS if c in runs]
    # train_* columns are diagnostics (computed without noise), not published results
    metrics = [c for c in runs if c.startswith("val_")
               or c in ("epsilon", "mia_reference_auc", "duration_s", *SPREAD)]
    grouped = runs.groupby(keys, dropna=False, sort=False)
    summary = grouped[metrics].mean()
    for metric, spread in SPREAD.items():
        summary[spread] = grouped[metric].std()
    summary["n_seeds"] = grouped.size()
    summary["seeds"] = grouped["seed"].agg(lambda s: " ".join(map(str, sorted(s))))
    summary["run_ids"] = grouped["run_id"].agg(" ".join)
    summary["data_kind"] = grouped["data_kind"].first()
    summary["data"] = grouped["data"].first()
    summary["mia_same_subjects"] = (grouped["mia_same_subjects"].first()
                                    if "mia_same_subjects" in runs else None)
    summary = summary.reset_index()
    pretrain_ids = set(runs["init_from"].dropna())
    summary["pretraining"] = summary["run_ids"].map(
        lambda ids: bool(set(ids.split()) & pretrain_ids))
    summary = summary.sort_values(["pretraining", "model", "method", "target_epsilon",
                                   "noise_multiplier", "max_grad_norm"],
                                  ascending=[False, True, True, True, True, True],
                                  na_position="first", kind="stable", ignore_index=True)
    summary.insert(0, "config", np.arange(1, len(summary) + 1))
    first = [c for c in SUMMARY_FIRST if c in summary]
    return summary[first + [c for c in summary if c not in first]]


def readable_table(summary: pd.DataFrame) -> pd.DataFrame:
    """Every configuration with the settings that distinguish it and mean ± spread."""
    s = summary.assign(pretrained=summary["init_from"].notna().map({True: "yes", False: "no"}))
    differing = plots.differing_columns(s, TABLE_KEYS)
    shown = [k for k in TABLE_KEYS if k in ("model", "method") or k in differing]
    table = s[["config", *shown]].copy()
    for col in ("noise_multiplier", "target_epsilon", "max_grad_norm", "lr"):  # "": default
        if col in table:
            table[col] = table[col].map(lambda v: "" if pd.isna(v) else f"{v:.4g}")
    table["role"] = s["pretraining"].map({True: "pretraining", False: ""})
    table["n_seeds"] = s["n_seeds"]
    table["epsilon"] = s["epsilon"].map(lambda v: "∞" if pd.isna(v) else f"{v:.3g}")
    for title, metric in (("Dice (fg)", "val_dice_fg_mean"), ("Dice (all)", "val_dice_all_mean"),
                          ("MIA AUC", "mia_auc")):
        table[title] = [plots.mean_spread(m, sd) for m, sd in zip(s[metric], s[SPREAD[metric]])]
    if "val_dice_fluid" in s:
        table["fluid Dice"] = s["val_dice_fluid"].map(lambda v: "" if pd.isna(v) else f"{v:.3f}")
    for col in [c for c in s if c.startswith("val_dice_fg_Subject")]:   # per patient
        table[f"Dice (fg) {col.removeprefix('val_dice_fg_')}"] = s[col].map(
            lambda v: "" if pd.isna(v) else f"{v:.3f}")
    if s["mia_reference_auc"].notna().any():
        table["MIA AUC at start"] = s["mia_reference_auc"].map(
            lambda v: "" if pd.isna(v) else f"{v:.3f}")
    for title, metric in (("MIA AUC gain over start", "mia_auc_gain"),
                          ("ε lower bound (one-run audit, 95 %)", "epsilon_lower_bound")):
        if metric in s and s[metric].notna().any():
            table[title] = [plots.mean_spread(m, sd, 2)
                            for m, sd in zip(s[metric], s[SPREAD[metric]])]
    return table if table["role"].any() else table.drop(columns="role")


def markdown(table: pd.DataFrame) -> str:
    """A GitHub-flavoured Markdown table (pipes in cells escaped)."""
    cells = [[str(v).replace("|", "\\|") for v in row] for row in table.itertuples(index=False)]
    lines = ["| " + " | ".join(table.columns) + " |", "|" + "---|" * len(table.columns)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in cells]) + "\n"


def stacked_history(store: RunStore, summary: pd.DataFrame) -> pd.DataFrame:
    """Every completed run's history with its configuration number, method and model."""
    frames = []
    for row in summary.itertuples():
        for run_id in row.run_ids.split():
            hist = store.read_history(run_id)
            frames.append(hist.assign(run_id=run_id, config=row.config, method=row.method,
                                      model=row.model))
    return pd.concat(frames, ignore_index=True)


def curves_chart(history: pd.DataFrame) -> alt.FacetChart:
    """Seed-mean training curves, one line per configuration, coloured by method: the
    per-run chart of the app cannot stay legible over a whole study."""
    series = [c for c in ("val_dice_fg_mean", "train_loss") if c in history]
    data = (history.groupby(["config", "method", "model", "epoch"])[series].mean()
            .reset_index().melt(id_vars=["config", "method", "model", "epoch"],
                                value_vars=series, var_name="series", value_name="value"))
    return alt.Chart(data).mark_line(opacity=0.8).encode(
        x=alt.X("epoch:Q", title="epoch", axis=alt.Axis(format="d", tickMinStep=1)),
        y=alt.Y("value:Q", title=None, scale=alt.Scale(zero=False)),
        color=plots.method_colour(), detail="config:N",
        tooltip=["config", "method", "model", "epoch", "series", "value"],
    ).properties(width=300, height=200).facet(
        row=alt.Row("series:N", title=None), column=alt.Column("model:N", title=None),
    ).resolve_scale(y="independent").properties(title="Training curves (mean over seeds)")


#: Most configurations a settings chart shows a row each; a larger grid (the landscape's
#: 150 cells) has a chart of its own.
MAX_SETTINGS_ROWS = 24


def _levers_at_one_budget(studied: pd.DataFrame) -> bool:
    """Whether configurations of one model and method share a privacy budget (so differ
    in some other setting), few enough for a row each: then a frontier would stack them
    on one ε."""
    private = studied[studied["method"].ne("non_dp")]
    budget = private[["model", "method", "target_epsilon", "noise_multiplier"]].astype(str)
    return bool(budget.duplicated().any()) and len(studied) <= MAX_SETTINGS_ROWS


def setting_labels(summary: pd.DataFrame) -> list[str]:
    """Each configuration as its number, method, budget and the settings (of the readable
    table's) in which the configurations differ, e.g. "3. Automatic Clipping, ε 3,
    depth 5, trainable decoder"."""
    keys = [k for k in plots.differing_columns(summary, TABLE_KEYS) if k not in (
            "method", "target_epsilon", "noise_multiplier", "pretrained", "data_kind")]
    labels = []
    for _, row in summary.iterrows():
        parts = [f"{row['config']}. {plots.METHOD_NAMES.get(row['method'], row['method'])}"]
        if row["method"] != "non_dp":
            parts.append(f"ε {row['target_epsilon']:g}" if pd.notna(row["target_epsilon"])
                         else f"σ {row['noise_multiplier']:g}")
        for k in keys:
            if v := plots.setting_value(row[k]):
                parts.append(f"{k.replace('_', ' ')} {v}")
        labels.append(", ".join(parts))
    return labels


def figures(store: RunStore, runs: pd.DataFrame, summary: pd.DataFrame,
            attempted: pd.DataFrame | None = None) -> dict[str, alt.TopLevelMixin]:
    """The report's charts by file stem; a chart without data is left out. ``attempted``:
    every selected run whatever its status (the landscape marks failed cells)."""
    if summary.empty:
        return {}
    studied = summary[~summary["pretraining"]]
    per_run = runs[runs["run_id"].isin(" ".join(studied["run_ids"]).split())]
    anchors = epsilon_zero_anchors(store, per_run)
    charts = {f"frontier_{model}": plots.frontier_chart(
        rows, spread="val_dice_fg_std", anchors=anchors[anchors["model"] == model])
        .properties(title=f"Privacy–utility frontier, {model} (mean ± sd over seeds)")
        for model, rows in studied.groupby("model")}
    if _levers_at_one_budget(studied):
        charts["settings"] = plots.settings_chart(
            studied.assign(label=setting_labels(studied)), spread="val_dice_fg_std",
            anchors=anchors)
    if len(studied):
        charts["curves"] = curves_chart(stacked_history(store, studied))
    by_sigma = per_run[per_run["method"].ne("non_dp") & per_run["target_epsilon"].isna()]
    if len(by_sigma):
        charts["dice_vs_sigma"] = plots.noise_chart(by_sigma)
    if studied["mia_auc"].notna().any():
        charts["audit_auc"] = plots.audit_chart(studied)
    if per_run.get("epsilon_lower_bound", pd.Series(dtype=float)).notna().any():
        charts["empirical_epsilon"] = plots.empirical_epsilon_chart(per_run)
    cells = landscape_cells(runs if attempted is None else attempted)
    if len(cells) and cells.groupby(["method", "optimizer"])["lr"].nunique().max() > 1:
        charts["landscape"] = landscape_chart(cells)
    return charts


def select_runs(runs: pd.DataFrame, run_ids: list[str]) -> pd.DataFrame:
    """The rows of ``run_ids`` (e.g. one profile's runs), plus a ``not started`` row for
    every id the store does not have, so a report says what is missing."""
    have = set(runs["run_id"]) if "run_id" in runs else set()
    missing = [{"run_id": r, "status": "not started", "error": ""} for r in run_ids
               if r not in have]
    chosen = runs[runs["run_id"].isin(run_ids)] if have else runs
    return pd.concat([chosen, pd.DataFrame(missing)], ignore_index=True) if missing else chosen


def write_report(runs_dir, out, run_ids: list[str] | None = None) -> list[Path]:
    """Write summary.csv, table.csv/.md, figures (PNG + the CSV behind each) and
    report.md into ``out`` for every run of the store, or only ``run_ids``; returns the
    files written."""
    store = RunStore(runs_dir)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    listed = store.list_runs()
    attempted = listed if run_ids is None else select_runs(listed, run_ids)
    runs, excluded = completed_runs(attempted)
    summary = summarise(runs)
    table = readable_table(summary)
    written = {"summary.csv": summary.to_csv(index=False), "table.csv": table.to_csv(index=False),
               "table.md": markdown(table)}
    for name, text in written.items():
        (out / name).write_text(text)
    paths = [out / name for name in written]
    charts = figures(store, runs, summary, attempted)
    for stem, chart in charts.items():
        (out / f"{stem}.png").write_bytes(plots.chart_to_png(chart))
        (out / f"{stem}.csv").write_bytes(plots.chart_to_csv(chart))
        paths += [out / f"{stem}.png", out / f"{stem}.csv"]
    (out / "report.md").write_text(_report_md(store, summary, table, charts, excluded))
    return [*paths, out / "report.md"]


#: What every report says about its privacy figures (issue: state the unit and the leaks).
PRIVACY_NOTE = (
    "ε is **B-scan-level** (ε, δ): it protects one B-scan of the training split; a patient "
    "contributes several (group privacy bounds what that implies per patient). Training "
    "loss, the median per-sample gradient norm and the clipped fraction of a DP run are "
    "computed from private data without noise: diagnostics, not covered by ε, and not in "
    "the tables. The membership-attack columns (MIA AUC, its gain) are an auditor's "
    "diagnostic computed from the private training images, likewise not covered by ε; the "
    "one-run audit's ε lower bound is post-processing of the released updates and public "
    "canaries. Learning rates, the C grid and epochs were chosen on validation Dice "
    "(Duke subjects 7–8), so validation scores are optimistic; the independent check is "
    "`dpstudy evaluate RUN --data OTHER --split test` on other patients.\n")


def _report_md(store, summary, table, charts, excluded) -> str:
    parts = [f"# dpstudy report\n\nRun store: `{store.root.resolve()}` — {len(summary)} "
             f"configuration(s) from {int(summary['n_seeds'].sum())} completed run(s); "
             f"mean ± sample standard deviation over seeds. `summary.csv` has every field.\n",
             PRIVACY_NOTE, markdown(table)]
    parts += [f"![{stem}]({stem}.png)\n" for stem in charts]
    if len(excluded):
        parts.append(f"## Runs not included ({len(excluded)})\n\n" + markdown(excluded.fillna("")))
    return "\n".join(parts)
