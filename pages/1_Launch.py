"""Launch: start one run or a grid as separate processes, follow them live, cancel them.

Everything shown comes from the run store and ``<runs>/.launches``, not from this
browser session, so reopening the app shows what is still training.
"""

import math
import shlex

import pandas as pd
import streamlit as st

from dpstudy import launcher
from dpstudy.config import CLIPPING_STYLES, DEVICES, METHODS, MODELS, RunConfig
from dpstudy.errors import DPStudyError
from dpstudy.sweep import expand_grid
from dpstudy.ui import page_config, runs, store

DEFAULT = RunConfig()
BY_SIGMA, BY_EPSILON = "noise multiplier σ", "target ε"


def _numbers(text: str, kind, name: str) -> list:
    try:
        values = [kind(v) for v in text.replace(",", " ").split()]
    except ValueError:
        raise DPStudyError(f"{name}: {text!r} is not a list of numbers like '0.5, 1, 2'") from None
    if not values:
        raise DPStudyError(f"{name}: give at least one value")
    return values


def _shared_fields() -> None:
    """Form fields every run of a launch shares (read back from session state by key)."""
    st.number_input("clipping threshold C", 0.001, value=DEFAULT.max_grad_norm, key="C",
                    help="per-sample bound (dp_sgd); auto_clip only rescales by it")
    st.selectbox("clipping style", CLIPPING_STYLES, key="clipping")
    st.caption("Random Sparsification")
    col1, col2 = st.columns(2)
    col1.number_input("final rate r*", 0.0, 0.99, DEFAULT.final_rate, key="final_rate")
    col2.number_input("masks per epoch", 1, value=DEFAULT.refresh, key="refresh")
    col1, col2 = st.columns(2)
    col1.number_input("epochs", 1, value=DEFAULT.epochs, key="epochs")
    col2.number_input("batch size", 1, value=DEFAULT.batch_size, key="batch_size")
    st.number_input("learning rate (empty: the method's default)", 0.0, value=None,
                    format="%g", key="lr")
    col1, col2 = st.columns(2)
    col1.number_input("image height", 16, value=DEFAULT.image_size[0], step=16, key="height")
    col2.number_input("image width", 16, value=DEFAULT.image_size[1], step=16, key="width")
    col1.number_input("base width", 1, value=DEFAULT.base_width, key="base_width")
    col2.number_input("depth", 1, value=DEFAULT.depth, key="depth")
    st.number_input("images per split (empty: all)", 1, value=None, key="limit")
    st.radio("data", ["synthetic", "folder"], horizontal=True, key="source",
             help="synthetic: the built-in OCT phantom; folder: prepared Duke data")
    st.text_input("data folder", key="data_path", placeholder="data/DukeData")
    st.selectbox("device", DEVICES, key="device",
                 help="auto: CUDA if present, else MPS, else CPU (not part of the run id)")


def _collect_shared() -> dict:
    s = st.session_state
    if s.source == "folder" and not s.data_path.strip():
        raise DPStudyError("data folder: give a path, or choose synthetic data")
    return {"max_grad_norm": s.C, "clipping": s.clipping, "final_rate": s.final_rate,
            "refresh": s.refresh, "epochs": s.epochs, "batch_size": s.batch_size,
            "lr": s.lr or None, "image_size": (s.height, s.width),
            "base_width": s.base_width, "depth": s.depth, "limit": s.limit,
            "data": "synthetic" if s.source == "synthetic" else s.data_path.strip(),
            "device": s.device}


def _single() -> tuple[list[str], str]:
    """``dpstudy train`` arguments from the form, and what they start."""
    s = st.session_state
    private = s.method != "non_dp"
    noise = {"noise_multiplier": s.sigma if private and s.by == BY_SIGMA else None,
             "target_epsilon": s.target_eps if private and s.by == BY_EPSILON else None}
    cfg = RunConfig(model=s.model, method=s.method, seed=s.seed, **noise, **_collect_shared())
    return launcher.train_argv(cfg), "a run"


def _grid() -> tuple[list[str], str]:
    """``dpstudy sweep`` arguments from the form, every run validated before anything starts."""
    s = st.session_state
    shared = _collect_shared()
    noise = _numbers(s.noise_values, float, "privacy values")
    axis = "noise_multiplier" if s.by == BY_SIGMA else "target_epsilon"
    seeds = _numbers(s.seeds, int, "seeds")
    configs = expand_grid(shared, {"model": s.models, "method": s.methods, axis: noise,
                                   "seed": seeds})
    if not configs:
        raise DPStudyError("the grid is empty: choose at least one model and one method")
    argv = launcher.sweep_argv(RunConfig(**shared), {
        "models": s.models, "methods": s.methods, f"{axis}s": noise, "seeds": seeds},
        jobs=s.jobs)
    return argv, f"a grid of {len(configs)} runs"


def launch_form() -> None:
    grid = st.sidebar.toggle("grid of runs (sweep)", key="grid")
    with st.sidebar.form("launch"):
        st.subheader("Launch a grid" if grid else "Launch a run")
        if grid:
            st.multiselect("models", MODELS, default=[MODELS[0]], key="models")
            st.multiselect("methods", METHODS, default=["non_dp", "dp_sgd"], key="methods")
        else:
            st.selectbox("model", MODELS, key="model")
            st.selectbox("method", METHODS, key="method")
        st.radio("privacy set by", [BY_SIGMA, BY_EPSILON], horizontal=True, key="by",
                 help="non_dp runs ignore both")
        if grid:
            st.text_input("σ or ε values", "0.5, 1, 2", key="noise_values")
            st.text_input("seeds", "0", key="seeds")
            st.number_input("runs at once", 1, 16, 1, key="jobs")
        else:
            st.number_input(BY_SIGMA, 0.01, value=1.0, key="sigma")
            st.number_input(BY_EPSILON, 0.01, value=8.0, key="target_eps")
            st.number_input("seed", 0, value=DEFAULT.seed, key="seed")
        _shared_fields()
        if not st.form_submit_button("Start", type="primary", key="start"):
            return
    try:
        args, what = _grid() if grid else _single()
        record = launcher.launch(args, store().root)
    except DPStudyError as exc:
        st.sidebar.error(str(exc))
        return
    st.sidebar.success(f"Started {what} (process {record['pid']}); it appears below "
                       f"once its data is loaded.")


def _fmt(value, spec=".4g") -> str:
    return "—" if value is None or (isinstance(value, float) and math.isnan(value)) \
        else format(value, spec)


def _running_run(row) -> None:
    with st.container(border=True):
        st.markdown(f"**{row.run_id}**")
        done = int(row.epochs_done) if pd.notna(row.epochs_done) else 0
        total = int(row.epochs) if pd.notna(row.epochs) else max(done, 1)
        st.progress(done / total, text=f"epoch {done} of {total}")
        for col, (label, value) in zip(st.columns(4), (
                ("train loss", row.train_loss), ("val Dice (fg mean)", row.val_dice_fg_mean),
                ("ε so far", row.epsilon), ("σ", row.noise_multiplier))):
            col.metric(label, _fmt(value))
        if st.button("Cancel run", key=f"cancel-run-{row.run_id}"):
            try:
                launcher.cancel_run(store(), row.run_id)
                st.info("Sent SIGTERM; the run records status cancelled.")
            except DPStudyError as exc:
                st.error(str(exc))


def _launch_entry(record: dict) -> None:
    state = ("running" if record["alive"] else "finished" if record["returncode"] is None
             else f"exited with status {record['returncode']}")
    with st.expander(f"{record['id']} · {record['kind']} · {state}", expanded=record["alive"]):
        st.code(shlex.join(record["argv"][1:]), language="bash")
        st.code(launcher.log_tail(record) or "(no output yet)", language="text")
        if record["alive"] and st.button("Cancel launch", key=f"cancel-launch-{record['id']}"):
            try:
                launcher.cancel_launch(store().root, record["id"])
                st.info("Sent SIGTERM to the launch's process group.")
            except DPStudyError as exc:
                st.error(str(exc))


@st.fragment(run_every="3s")
def progress() -> None:
    """Refreshes on its own: what is training now, and the latest launches' output."""
    df = runs()
    running = df[df["status"] == "running"]
    st.subheader(f"Training now ({len(running)})")
    if running.empty:
        st.caption("No run is training. Start one with the form in the sidebar.")
    for row in running.itertuples():
        _running_run(row)
    launches = launcher.list_launches(store().root)
    if launches:
        st.subheader("Launches from this app")
        for record in launches[:10]:
            _launch_entry(record)


page_config("Launch")
st.title("Launch and follow runs")
st.caption(f"Runs go to `{store().root.resolve()}`; training continues when the browser "
           f"closes. Refreshes every 3 s.")
launch_form()
progress()
