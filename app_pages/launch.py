"""Launch: start a run, a grid or a study profile as a separate process, see how long it
will take before it starts, follow it, cancel it, and find its results.

The form is checked as it is filled in (the library's own errors, shown here) and a
launch that fails anyway says why in its card. Everything the page follows comes from
the run store and ``<runs>/.launches``, not from this browser session, so reopening the
app shows what is still training.
"""

import shlex
import time

import pandas as pd
import streamlit as st

from dpstudy import estimate, launch_form, launcher, plots
from dpstudy.config import METHODS, MODELS, RunConfig
from dpstudy.data.source import SYNTHETIC, load_data, resolve_data_spec
from dpstudy.errors import DPStudyError
from dpstudy.sweep import PROFILES_DIR, expand_grid, load_profile
from dpstudy.ui import CURVES_PAGE, MASKS_PAGE, estimator, run_actions, runs, store

ONE, GRID, PROFILE = "one run", "grid of runs", "study profile"
BY_SIGMA, BY_EPSILON = "noise multiplier σ", "target B-scan-level ε"
PHANTOM, FOLDER = "synthetic phantom", "data folder"
SCRATCH, PRETRAIN = "from scratch", "pretrain on the phantom first"
DEFAULT = launch_form.DEFAULT
SPECS = launch_form.fields()


def _numbers(text: str, kind, name: str) -> list:
    try:
        values = [kind(v) for v in text.replace(",", " ").split()]
    except ValueError:
        raise DPStudyError(f"{name}: {text!r} is not a list of numbers like '0.5, 1, 2'") from None
    if not values:
        raise DPStudyError(f"{name}: give at least one value")
    return values


def _privacy(methods: set[str], grid: bool) -> dict:
    """σ or target ε (one value, or the grid's list) and C; nothing for non-private runs."""
    if not methods - {"non_dp"}:
        return {}
    st.markdown("**Privacy** (per B-scan: ε protects one training B-scan)")
    by = st.radio("privacy set by", [BY_SIGMA, BY_EPSILON], horizontal=True, key="by")
    field = "noise_multiplier" if by == BY_SIGMA else "target_epsilon"
    if grid:
        text = st.text_input(f"{by} values", "0.5, 1, 2", key="noise_values")
        values = {field: _numbers(text, float, f"{by} values")}
    else:
        default = 1.0 if by == BY_SIGMA else 8.0
        values = {field: st.number_input(by, value=default, format="%g", key=field)}
    launch_form.widget(SPECS["max_grad_norm"])
    return {**values, "max_grad_norm": launch_form.value(SPECS["max_grad_norm"], True)}


def _data_source(key: str, default: str) -> str:
    """The synthetic phantom, or a data folder (prefilled from $DPSTUDY_DATA or
    data/DukeData where there is one)."""
    source = st.radio("data", [PHANTOM, FOLDER], index=[PHANTOM, FOLDER].index(default),
                      horizontal=True, key=f"{key}source",
                      help="the built-in synthetic OCT phantom, or a prepared Duke folder "
                           "(dpstudy prepare-duke)")
    if source == PHANTOM:
        return SYNTHETIC
    found = resolve_data_spec(None)
    data = st.text_input("data folder", "" if found == SYNTHETIC else found,
                         key=f"{key}data_path", placeholder="data/DukeData").strip()
    if not data:
        raise DPStudyError("data folder: give a path, or choose the synthetic phantom")
    error = _data_error(data)
    if error:
        raise DPStudyError(error)
    return data


@st.cache_data(ttl=10, show_spinner=False)
def _data_error(folder: str) -> str | None:
    """The trainer's own error for a data folder it cannot read (one scan per split is
    loaded to find out), or None."""
    try:
        load_data(folder, limit=1)
    except DPStudyError as exc:
        return str(exc)
    return None


def _data_and_size() -> dict:
    """Data, image size, network size, epochs, batch, images per split."""
    st.markdown("**Data and size**")
    values = {"data": _data_source("", PHANTOM)}
    left, right = st.columns(2)
    height = left.number_input("image height", 16, value=DEFAULT.image_size[0], step=16,
                               key="height")
    width = right.number_input("image width", 16, value=DEFAULT.image_size[1], step=16,
                               key="width")
    values["image_size"] = (height, width)
    for i, name in enumerate(("epochs", "batch_size", "base_width", "depth", "limit")):
        launch_form.widget(SPECS[name], (left, right)[i % 2])
        values[name] = launch_form.value(SPECS[name], True)
    return values


def _start_from(models: list[str], values: dict) -> int | str | None:
    """init_from: None (scratch), a completed phantom run that fits, or the number of
    epochs of a pretraining run to train first."""
    options = [SCRATCH, PRETRAIN]
    if len(models) == 1:
        options += launch_form.pretraining_runs(runs(), models[0], values["base_width"],
                                                values["depth"])
    choice = st.selectbox("start from", options, key="start_from",
                          help="a completed non-private run on the phantom (public data, so "
                               "free in privacy) with this architecture, or one trained first")
    if choice == PRETRAIN:
        return st.number_input("pretraining epochs", 1, value=DEFAULT.epochs,
                               key="pretrain_epochs")
    return None if choice == SCRATCH else choice


def _settings(models: list[str], methods: set[str], grid: bool) -> tuple[dict, object]:
    """Every setting but the grid's axes (RunConfig fields), and the start-from choice."""
    values = launch_form.method_settings(methods)
    values.update(_privacy(methods, grid))
    values.update(_data_and_size())
    start = _start_from(models, values)
    if isinstance(start, str):
        values["init_from"] = start
    if not grid:
        launch_form.widget(SPECS["seed"])
        values["seed"] = launch_form.value(SPECS["seed"], True)
    values.update(launch_form.more_settings(methods, values))
    return values, start


def _with_pretraining(configs: list[RunConfig], axes: dict, start, what: dict):
    """``configs`` as they are, or, to pretrain first, the profile that trains a phantom
    run before them (written to the store's launch folder)."""
    if not isinstance(start, int):
        return configs, what
    path = launcher.write_profile(store().root,
                                  launch_form.pretrain_profile(configs, axes, start))
    data = configs[0].data
    return load_profile(str(path), {"data": data})[0], {
        "kind": PRETRAIN, "profile": str(path), "data": data,
        "label": f"phantom pretraining, then {what['label'][0].lower()}{what['label'][1:]}"}


def _single() -> tuple[list[RunConfig], dict]:
    left, right = st.columns(2)
    model = left.selectbox("model", MODELS, index=MODELS.index(DEFAULT.model), key="model",
                           format_func=plots.MODEL_NAMES.get)
    method = right.selectbox("method", METHODS, index=METHODS.index(DEFAULT.method),
                             key="method", format_func=plots.METHOD_NAMES.get)
    values, start = _settings([model], {method}, grid=False)
    cfg = RunConfig(model=model, method=method, **values)
    axes = {k: [getattr(cfg, k)] for k in ("model", "method", "noise_multiplier",
                                           "target_epsilon", "seed")}
    return _with_pretraining([cfg], axes, start, {"kind": ONE, "label": f"Run {cfg.run_id()}"})


def _grid() -> tuple[list[RunConfig], dict]:
    models = st.multiselect("models", MODELS, default=[DEFAULT.model], key="models",
                            format_func=plots.MODEL_NAMES.get)
    methods = st.multiselect("methods", METHODS, default=["non_dp", "dp_sgd"], key="methods",
                             format_func=plots.METHOD_NAMES.get)
    seeds = _numbers(st.text_input("seeds", "0", key="seeds"), int, "seeds")
    values, start = _settings(models, set(methods), grid=True)
    axes = {"model": models, "method": methods, "seed": seeds,
            **{k: values.pop(k) for k in ("noise_multiplier", "target_epsilon") if k in values}}
    configs = expand_grid(values, axes)
    if not configs:
        raise DPStudyError("the grid is empty: choose at least one model and one method")
    return _with_pretraining(configs, axes, start, {
        "kind": GRID, "base": values, "axes": axes, "label": f"Grid of {len(configs)} runs"})


def _profile() -> tuple[list[RunConfig], dict]:
    names = sorted(p.stem for p in PROFILES_DIR.glob("*.toml"))
    name = st.selectbox("profile", names, index=names.index("quick"), key="profile")
    text = (PROFILES_DIR / f"{name}.toml").read_text()
    with st.expander("what this profile runs"):
        st.text("\n".join(line[2:] for line in text.splitlines() if line.startswith("# ")))
    data = _data_source("profile_", FOLDER if resolve_data_spec(None) != SYNTHETIC
                        else PHANTOM)
    configs, _ = load_profile(name, {"data": data})
    return configs, {"kind": PROFILE, "profile": name, "data": data,
                     "label": f"Study profile {name}: {len(configs)} runs"}


def _argv(configs: list[RunConfig], what: dict, jobs: int) -> list[str]:
    if what["kind"] in (PROFILE, PRETRAIN):
        return launcher.profile_argv(what["profile"], what["data"], jobs)
    if what["kind"] == GRID:
        axes = what["axes"]
        grid = {"models": axes["model"], "methods": axes["method"], "seeds": axes["seed"],
                **{f"{k}s": v for k, v in axes.items()
                   if k in ("noise_multiplier", "target_epsilon")}}
        return launcher.sweep_argv(RunConfig(**what["base"]), grid, jobs=jobs)
    return launcher.train_argv(configs[0])


def _launch(configs: list[RunConfig], what: dict, jobs: int) -> dict:
    """Start the process, unless there is nothing left to train."""
    if all(store().is_completed(c.run_id()) for c in configs):
        raise DPStudyError(f"{'this run is' if len(configs) == 1 else 'every run here is'} "
                           f"already completed ({configs[0].run_id()}"
                           f"{', …' if len(configs) > 1 else ''}): change a setting or the "
                           f"seed, or look at it on the Overview page")
    return launcher.launch(_argv(configs, what, jobs), store().root, label=what["label"],
                           run_ids=[c.run_id() for c in configs],
                           estimate_s=_estimate(configs, jobs)[0])


def _estimate(configs: list[RunConfig], jobs: int) -> tuple[float, str]:
    """Seconds until every run not yet completed is done, and the estimate's basis."""
    est, s = estimator(), store()
    todo = [c for c in configs if not s.is_completed(c.run_id())]
    return estimate.remaining_seconds(est, todo, jobs), est.basis(todo or configs)


def form() -> None:
    mode = st.radio("launch", [ONE, GRID, PROFILE], horizontal=True, key="mode")
    try:
        configs, what = {ONE: _single, GRID: _grid, PROFILE: _profile}[mode]()
        jobs = 1 if len(configs) == 1 else st.number_input("runs at once", 1, 16, 1,
                                                          key="jobs")
        seconds, basis = _estimate(configs, jobs)
    except DPStudyError as exc:
        st.error(str(exc))
        st.button("Start", type="primary", key="start", disabled=True)
        return
    done = sum(store().is_completed(c.run_id()) for c in configs)
    size = f"{len(configs)} run" + "s" * (len(configs) > 1) + (
        f", {done} of them already completed (skipped)" if done else "")
    st.info(f"**{size}**: {estimate.duration_text(seconds)}"
            f"{f' with {jobs} at once' if jobs > 1 else ''} ({basis}).")
    if not st.button("Start", type="primary", key="start"):
        return
    try:
        record = _launch(configs, what, jobs)
    except DPStudyError as exc:
        st.error(str(exc))
        return
    st.success(f"Started: {record['label']} (launch {record['id']}). Follow it on the right.")


def _metrics(row) -> None:
    done = int(row.epochs_done) if pd.notna(row.epochs_done) else 0
    total = int(row.epochs) if pd.notna(row.epochs) else max(done, 1)
    st.progress(done / total, text=f"{row.run_id}: epoch {done} of {total}")
    shown = [("training loss (diagnostic)", row.train_loss, ".4g"), ("Dice (foreground)",
             row.val_dice_fg_mean, ".3f")]
    if row.method != "non_dp":
        shown += [("B-scan-level ε so far", row.epsilon, ".3g"),
                  ("noise σ", row.noise_multiplier, ".3g")]
    for col, (label, value, spec) in zip(st.columns(4), shown):
        col.metric(label, "–" if pd.isna(value) else format(value, spec))


def _results(rows: pd.DataFrame) -> None:
    """Final Dice and ε of a launch's finished runs, and where to look at them."""
    done = rows[rows["status"] != "running"]
    if done.empty:
        return
    table = pd.DataFrame({
        "run": done["run_id"], "status": done["status"],
        "Dice (foreground)": pd.to_numeric(done["val_dice_fg_mean"], errors="coerce"),
        "B-scan-level ε": [("∞" if m == "non_dp" else "–" if pd.isna(e) else f"{e:.3g}")
                           for m, e in zip(done["method"], done["epsilon"])]})
    st.dataframe(table, hide_index=True, placeholder="–",
                 column_config={"Dice (foreground)": st.column_config.NumberColumn(
                     format="%.3f")})
    completed = list(done.loc[done["status"] == "completed", "run_id"])
    if completed:
        left, right = st.columns(2)
        left.page_link(MASKS_PAGE, label="Masks of " + ("this run" if len(completed) == 1
                                                         else "the first run"),
                       query_params={"run": completed[0]})
        right.page_link(CURVES_PAGE, label="Curves of " + ("this run" if len(completed) == 1
                                                           else "these runs"),
                        query_params={"runs": ",".join(completed[:12])})


def _launch_card(record: dict, df: pd.DataFrame) -> None:
    state, reason = launcher.state(record)
    ids = record.get("run_ids") or []
    rows = df[df["run_id"].isin(ids)]
    with st.container(border=True, key=f"launch-{record['id']}"):
        st.markdown(f"**{record.get('label', record['kind'])}** · {state}")
        elapsed = time.time() - record["started"]
        expected = record.get("estimate_s")
        st.caption(f"launch {record['id']}, started {time.strftime('%H:%M', time.localtime(record['started']))}"
                   + (f", running for {estimate.duration_text(elapsed).removeprefix('about ')}"
                      if record["alive"] else "")
                   + (f"; expected {estimate.duration_text(expected)}" if expected else ""))
        if state == "failed":
            st.error(f"Failed: {reason}")
        elif state == "stopped":
            st.warning(reason)
        if record["alive"] and len(ids) > 1:
            done = int((rows["status"] == "completed").sum())
            current = list(rows.loc[rows["status"] == "running", "run_id"])
            st.progress(done / len(ids), text=f"run {min(done + 1, len(ids))} of {len(ids)}"
                        + (f": {', '.join(current)}" if current else ""))
        for row in rows[rows["status"] == "running"].itertuples():
            _metrics(row)
        _results(rows)
        if record["kind"] in ("evaluate", "audit") and not record["alive"]:
            st.code(launcher.log_tail(record, 60) or "(no output)", language="text")
        if state == "completed" and len(ids) == 1 and ids[0] in set(df["run_id"]):
            run_actions(ids[0], df.set_index("run_id").at[ids[0], "data"],
                        f"launch-{record['id']}")
        if record["alive"] and st.button("Cancel", key=f"cancel-launch-{record['id']}"):
            try:
                launcher.cancel_launch(store().root, record["id"])
                st.info("Sent SIGTERM; runs record status cancelled.")
            except DPStudyError as exc:
                st.error(str(exc))
        with st.expander("command and output"):
            st.code(shlex.join(record["argv"][1:]), language="bash")
            st.code(launcher.log_tail(record) or "(no output yet)", language="text")


def _elsewhere(row) -> None:
    """A run training in a process the app did not start (its one cancel control)."""
    with st.container(border=True):
        _metrics(row)
        if st.button("Cancel run", key=f"cancel-run-{row.run_id}"):
            try:
                launcher.cancel_run(store(), row.run_id)
                st.info("Sent SIGTERM; the run records status cancelled.")
            except DPStudyError as exc:
                st.error(str(exc))


@st.fragment(run_every="3s")
def progress() -> None:
    """Refreshes on its own: the latest launches, and runs trained from elsewhere."""
    df = runs()
    records = launcher.list_launches(store().root)[:10]
    st.subheader("Launches")
    if not records:
        st.caption("Nothing launched from the app yet: start something with the form.")
    for record in records:
        _launch_card(record, df)
    running = df[df["status"] == "running"]
    ours = {r for rec in records if rec["alive"] for r in rec.get("run_ids") or []}
    elsewhere = [row for row in running.itertuples() if row.run_id not in ours
                 and launcher.owner(records, _pid(row.run_id)) is None]
    if elsewhere:
        st.subheader(f"Training now, started elsewhere ({len(elsewhere)})")
        for row in elsewhere:
            _elsewhere(row)


def _pid(run_id: str):
    try:
        return store().read_meta(run_id).get("pid")
    except DPStudyError:
        return None


st.title("Launch and follow runs")
st.caption(f"Runs go to `{store().root.resolve()}`; they keep training when the browser "
           f"closes. The right column refreshes every 3 s.")
form_column, live_column = st.columns([5, 6], gap="large")
with form_column:
    form()
with live_column:
    progress()
