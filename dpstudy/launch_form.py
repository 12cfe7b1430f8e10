"""The Launch page's form: every run setting, derived from :class:`RunConfig` and the CLI.

Each field of ``RunConfig`` that ``dpstudy train`` has an option for gets a widget built
from the field's type, the option's choices (the config module's choice tuples) and its
help, so a field or choice added to either appears here without editing this module.
Fields that mean nothing for the chosen method are hidden and keep their defaults (a
hidden value must not change a run's identity). Widgets are keyed by field name.

The defaults are the quick profile's phantom pretraining run: a few minutes on a laptop
CPU for a model that visibly segments (203 s on the development machine's 2 shared cores
for foreground Dice 0.76 on the phantom, in the committed results).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import pandas as pd
import streamlit as st

from . import launcher
from .config import RunConfig
from .data.source import SYNTHETIC
from .sweep import load_profile

#: The quick profile's U-Net pretraining run (the first config of the profile).
DEFAULT = load_profile("quick", {"data": SYNTHETIC})[0][0]
#: Fields with a place of their own in the form (the rest go under "More settings").
MAIN = ("model", "method", "noise_multiplier", "target_epsilon", "max_grad_norm", "epochs",
        "batch_size", "image_size", "base_width", "depth", "data", "limit", "seed",
        "init_from")
#: Settings of one method, shown right under it: field -> does it apply, given the
#: chosen methods and the values so far.
METHOD_FIELDS = {
    "clip_fn": lambda methods, v: "random_sparsification" in methods,
    "final_rate": lambda methods, v: "random_sparsification" in methods,
    "refresh": lambda methods, v: "random_sparsification" in methods,
    "gamma": lambda methods, v: "auto_clip" in methods or (
        "random_sparsification" in methods and v.get("clip_fn") == "automatic"),
}
#: Other settings that apply only sometimes.
CONDITIONAL = {
    "momentum": lambda methods, v: v.get("optimizer") == "sgd",
    "aug_multiplicity": lambda methods, v: bool(v.get("augment")),
    "adapter_rank": lambda methods, v: v.get("trainable") == "adapters",
}
#: Settings of the privacy mechanism: hidden when only non-private runs are launched.
PRIVATE_ONLY = ("noise_multiplier", "target_epsilon", "max_grad_norm", "clipping", "clip_fn",
                "gamma", "final_rate", "refresh", "delta", "accountant", "grad_sample_mode",
                "max_physical_batch")
#: Labels where the field name alone says too little.
LABELS = {
    "noise_multiplier": "noise multiplier σ", "target_epsilon": "target B-scan-level ε",
    "max_grad_norm": "clipping bound C", "clip_fn": "clip function (Random Sparsification)",
    "gamma": "Automatic Clipping γ", "final_rate": "final sparsity r*",
    "refresh": "masks per epoch", "delta": "δ", "lr": "learning rate (empty: the method's "
    "default)", "limit": "images per split (empty: all)", "audit_holdout": "audit hold-out "
    "share", "audit_canaries": "one-run audit canaries m (0: none)", "audit_canary_images":
    "one-run audit canary B-scans m (0: none)", "max_physical_batch": "largest physical batch (empty: no split)",
}


@dataclass(frozen=True)
class Field:
    """One form field: what widget, with which default and choices."""

    name: str
    kind: str            # choice | bool | int | float | text
    optional: bool
    default: object
    choices: tuple = ()
    help: str | None = None

    @property
    def label(self) -> str:
        return LABELS.get(self.name, self.name.replace("_", " "))


def fields() -> dict[str, Field]:
    """Every ``RunConfig`` field ``dpstudy train`` can set, as a form field."""
    actions, out = launcher.cli_options("train"), {}
    for f in dataclasses.fields(RunConfig):
        action = actions.get(f.name)
        if action is None:
            continue
        kind = str(f.type).replace(" | None", "").strip()
        if action.choices:
            kind = "choice"
        elif kind == "str":
            kind = "text"
        out[f.name] = Field(f.name, kind, "None" in str(f.type), getattr(DEFAULT, f.name),
                            tuple(action.choices or ()), action.help)
    return out


def applies(name: str, methods: set[str], values: dict) -> bool:
    """Whether field ``name`` means anything for runs of ``methods`` with ``values``."""
    if name in PRIVATE_ONLY and not methods - {"non_dp"}:
        return False
    rule = METHOD_FIELDS.get(name) or CONDITIONAL.get(name)
    return rule is None or rule(methods, values)


def _step(default) -> float:
    return 10.0 ** math.floor(math.log10(abs(default))) if default else 0.01


def widget(spec: Field, where=st) -> None:
    """The widget of one field, keyed by its name (its value is read from session state)."""
    common = {"key": spec.name, "help": spec.help}
    if spec.kind == "choice":
        where.selectbox(spec.label, spec.choices, index=spec.choices.index(spec.default)
                        if spec.default in spec.choices else 0, **common)
    elif spec.kind == "bool":
        where.checkbox(spec.label, value=bool(spec.default), **common)
    elif spec.kind == "int":
        where.number_input(spec.label, value=spec.default, step=1,
                           placeholder="unset" if spec.optional else None, **common)
    elif spec.kind == "float":
        where.number_input(spec.label, value=spec.default, format="%g",
                           step=_step(spec.default), placeholder="unset" if spec.optional
                           else None, **common)
    elif spec.kind == "text":
        where.text_input(spec.label, value=spec.default or "", **common)


def value(spec: Field, shown: bool):
    """A field's value: the widget's if shown, else the default."""
    v = st.session_state.get(spec.name, spec.default) if shown else spec.default
    return (v or None) if spec.kind == "text" and spec.optional else v


def method_settings(methods: set[str]) -> dict:
    """Widgets of the chosen methods' own settings; returns every one's value."""
    specs, values = fields(), {}
    for name in (n for n in METHOD_FIELDS if n in specs):  # clip_fn first: γ depends on it
        shown = applies(name, methods, values)
        if shown:
            widget(specs[name])
        values[name] = value(specs[name], shown)
    return values


def more_settings(methods: set[str], taken: dict) -> dict:
    """The "More settings" expander: every other field that applies; returns their values."""
    specs = fields()
    rest = [s for s in specs.values() if s.name not in MAIN and s.name not in METHOD_FIELDS]
    values = dict(taken)
    with st.expander("More settings: optimizer, accountant, augmentation, …"):
        for spec in rest:
            shown = applies(spec.name, methods, values)
            if shown:
                widget(spec)
            values[spec.name] = value(spec, shown)
    return {s.name: values[s.name] for s in rest}


def pretraining_runs(runs: pd.DataFrame, cfg_model: str, base_width: int, depth: int
                     ) -> list[str]:
    """Completed non-private runs on the phantom whose weights fit the architecture:
    what a run (private ones included) may start from."""
    if runs.empty:
        return []
    ok = ((runs["status"] == "completed") & (runs["method"] == "non_dp")
          & (runs["data_kind"] == "synthetic") & (runs["model"] == cfg_model)
          & (pd.to_numeric(runs.get("base_width"), errors="coerce") == base_width)
          & (pd.to_numeric(runs.get("depth"), errors="coerce") == depth))
    return sorted(runs.loc[ok, "run_id"])


def pretrain_profile(configs: list[RunConfig], axes: dict, epochs: int) -> dict:
    """A study profile (for :func:`launcher.write_profile`) that trains ``configs`` (one
    grid: they differ only in ``axes``) after a phantom pretraining run of ``epochs``
    epochs per architecture; the sweep trains them in that order."""
    base = {k: v for k, v in configs[0].to_dict().items()
            if k not in (*axes, "init_from") and v is not None}
    grid = {k: [x for x in v if x is not None] for k, v in axes.items()}
    grid = {k: v for k, v in grid.items() if v}
    return {"base": base, "pretrain": {"epochs": epochs}, "grid": [{**grid, "pretrained": True}]}
