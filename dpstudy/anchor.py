"""The ε = 0 anchor: what the public pretraining alone scores on the private runs' data.

A private model starts from a phantom-pretrained network, which already segments the
validation patients before any private step. Reported beside a frontier, that score is
the floor private fine-tuning must beat: the utility that costs no privacy at all.
"""

from __future__ import annotations

import pandas as pd

from .errors import DPStudyError
from .evaluate import evaluate_run
from .store import RunStore


def epsilon_zero_anchors(store: RunStore, runs: pd.DataFrame,
                         metric: str = "val_dice_fg_mean") -> pd.DataFrame:
    """One row per (pretraining run, data) that DP runs of ``runs`` start from: ``model``,
    its ``base_width``, ``depth`` and ``image_size`` (where ``runs`` has them),
    ``init_from``, ``data`` and ``metric``, the pretraining checkpoint scored on the
    validation split of those runs' data, on the images they were scored on (their
    ``limit``). A pretraining run that cannot be scored (missing, or its data gone) is
    left out."""
    cols = ["model", "base_width", "depth", "image_size", "init_from", "data", metric]
    if runs.empty or "init_from" not in runs or not metric.startswith("val_"):
        return pd.DataFrame(columns=cols)
    private = runs[runs["method"].ne("non_dp") & runs["init_from"].notna()]
    have = set(store.run_ids())
    rows = []
    for (start, data), group in private.groupby(["init_from", "data"], sort=True):
        if start not in have:
            continue
        limit = pd.to_numeric(group["limit"], errors="coerce").iloc[0] if "limit" in group \
            else float("nan")
        try:
            scores = evaluate_run(store.root, start, data=data, split="val",
                                  limit=None if pd.isna(limit) else int(limit))
        except DPStudyError:
            continue
        key = metric.removeprefix("val_")
        if key in scores:
            first = group.iloc[0]
            rows.append({"model": first["model"], "base_width": first.get("base_width"),
                         "depth": first.get("depth"), "image_size": first.get("image_size"),
                         "init_from": start, "data": data, metric: scores[key]})
    return pd.DataFrame(rows, columns=cols)
