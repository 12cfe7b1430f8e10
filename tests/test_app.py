"""The Streamlit app through ``AppTest``, against a store of real tiny trainings."""

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow as pa
import pytest
from streamlit.testing.v1 import AppTest

from dpstudy import launch_form, launcher
from dpstudy.cli import START_HINT, build_parser
from dpstudy.config import METHODS, RunConfig
from dpstudy.reference import DEFAULT_RESULTS, load_reports
from dpstudy.store import RunStore
from dpstudy.sweep import load_profile
from dpstudy.ui import PAGES

REPO = Path(__file__).resolve().parents[1]
TINY = ["--data", "synthetic", "--limit", "4", "--batch-size", "2", "--image-size", "32", "32",
        "--base-width", "8", "--depth", "2", "--epochs", "1", "--quiet"]
RUNS = {"non_dp": ["--method", "non_dp"],
        "dp_sgd": ["--method", "dp_sgd", "--noise-multiplier", "1"],
        "auto_clip": ["--method", "auto_clip", "--noise-multiplier", "2"]}
OVERVIEW, STUDY, LAUNCH, MASKS, FRONTIER, LANDSCAPE, CURVES = (path for path, _, _ in PAGES)
#: Upper bound for a launched process to get somewhere: generous, the two cores are shared.
LONG = 900
#: form values for a tiny launch (widget key -> value)
TINY_FORM = {"epochs": 1, "batch_size": 2, "height": 32, "width": 32, "base_width": 8,
             "depth": 2, "limit": 4}


def one_thread_env() -> dict:
    """Child trainings share two cores with everything else: one thread each."""
    return {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="session")
def run_store(tmp_path_factory) -> Path:
    """Three real 1-epoch trainings through the CLI: non-private and two DP runs."""
    root = tmp_path_factory.mktemp("runs")
    procs = [subprocess.Popen([sys.executable, "-m", "dpstudy", "train", *args, *TINY,
                               "--runs-dir", str(root)], env=one_thread_env(),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for args in RUNS.values()]
    for proc in procs:
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err
    return root


@pytest.fixture
def app_for(monkeypatch):
    """An AppTest of the app on a given store."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")

    def make(root: Path) -> AppTest:
        monkeypatch.setenv("DPSTUDY_RUNS", str(root))
        return AppTest.from_file(str(REPO / "streamlit_app.py"), default_timeout=60)
    return make


def run_page(at: AppTest, page: str) -> AppTest:
    at.switch_page(page).run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def arrow(data: bytes):
    return pa.ipc.open_stream(data).read_all().to_pandas()


def chart_data(chart):
    """The DataFrame a vega_lite_chart element carries (Arrow IPC)."""
    (dataset,) = chart.proto.datasets
    return arrow(dataset.data.data)


def shown_table(element):
    """What a dataframe element displays: the Styler's display values if it has them."""
    styled = element.proto.arrow_data.styler.display_values
    return arrow(styled) if styled else element.value


def run_ids(root: Path, method: str) -> list[str]:
    df = RunStore(root).list_runs()
    return sorted(df.loc[df["method"] == method, "run_id"])


def wait_for(condition, at: AppTest | None = None, timeout: float = 90.0):
    """Poll (rerunning the app: its run_every fragment does not fire in AppTest)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if at is not None:
            at.run()
        value = condition()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError("timed out waiting for the condition")


def widgets(at: AppTest) -> dict:
    """Every input widget of the current page by key."""
    return {w.key: w for kind in ("text_input", "number_input", "selectbox", "multiselect",
                                  "radio", "checkbox", "toggle") for w in at.get(kind)}


def fill(at: AppTest, values: dict) -> AppTest:
    """Set form fields by widget key, one at a time (fields appear as others change)."""
    for key, value in values.items():
        widgets(at)[key].set_value(value)
        at.run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def card_box(at: AppTest, record: dict):
    """The container of a launch's card on the Launch page (None if not shown)."""
    return next((c for c in at.get("flex_container")
                 if c.proto.id.endswith(f"-launch-{record['id']}")), None)


def card(at: AppTest, record: dict) -> str:
    """The text of a launch's card."""
    box = card_box(at, record)
    return "" if box is None else " ".join(
        e.value for kind in ("markdown", "caption", "error", "warning") for e in box.get(kind))


def launch_record(root: Path, launch_id: str) -> dict:
    return next(r for r in launcher.list_launches(root) if r["id"] == launch_id)


# --- navigation, empty store, committed results -------------------------------------

def test_navigation_names_every_page_without_icons():
    """``st.navigation`` with explicit titles, Overview first at ``/``; no ``pages/``
    folder (Streamlit would fall back to folder-based navigation) and no Material icons
    (fetched from outside)."""
    source = (REPO / "streamlit_app.py").read_text()
    assert "st.navigation(" in source and "icon=" not in source
    assert [title for _, title, _ in PAGES][:3] == ["Overview", "Study results", "Launch"]
    assert PAGES[0][2] == "" and all(url == url.lower() for _, _, url in PAGES)
    assert not (REPO / "pages").exists()
    for path, _, _ in PAGES:
        assert ":material/" not in (REPO / path).read_text(), path
    assert sorted(p.name for p in (REPO / "app_pages").glob("*.py")) == \
        sorted(Path(p).name for p, _, _ in PAGES)


def test_empty_store_explains_how_to_start_and_shows_the_committed_study(tmp_path, app_for):
    at = app_for(tmp_path / "none")
    for page in (MASKS, FRONTIER, CURVES):  # every page that reads runs points to Launch
        run_page(at, page)
        assert START_HINT in at.info[0].value
        assert [link.proto.page for link in at.get("page_link")][0].endswith("launch")
    at.switch_page(OVERVIEW).run()
    assert at.title[0].value == "Overview: your runs"
    assert "empty" in at.info[0].value and START_HINT in at.info[0].value
    assert "What the study found (committed reference results)" in [
        s.value for s in at.subheader]
    first = load_reports()[0]
    assert [img.proto.imgs[0].caption for img in at.get("image")] == [first.figures[0].name]
    assert any(first.commands[0] in c.value for c in at.caption)


def test_empty_state_hint_is_a_valid_command_spelled_as_in_the_readme():
    readme = (REPO / "README.md").read_text()
    assert START_HINT.startswith("dpstudy train ") and "dpstudy train --model" in readme
    args = vars(build_parser().parse_args(START_HINT.split()[1:]))
    cfg = RunConfig(**{k: v for k, v in args.items() if k in RunConfig.__dataclass_fields__
                       and v is not None})
    for field in ("model", "method", "data", "base_width", "depth", "epochs", "image_size",
                  "batch_size"):  # what matters for a non-private run: the form's default
        assert getattr(cfg, field) == getattr(launch_form.DEFAULT, field), field


def test_study_page_shows_committed_reports_with_their_commands(tmp_path, app_for):
    at = run_page(app_for(tmp_path / "none"), STUDY)
    assert "Committed reference results" in at.info[0].value
    reports = load_reports(DEFAULT_RESULTS)
    assert reports[0].folder.name == "matched" and {"levers", "audit"} <= {
        r.folder.name for r in reports}
    shown = [img.proto.imgs[0].caption for img in at.get("image")]
    assert shown == [p.name for p in reports[0].figures]  # the ε-matched report first
    assert at.code[0].value == "\n".join(reports[0].commands)
    assert any("| config | model | method" in m.value for m in at.markdown)
    at.radio(key="report").set_value(3).run()
    assert at.header[0].value == reports[3].title
    assert "audit_auc.png" in [img.proto.imgs[0].caption for img in at.get("image")]

    # a folder given in the sidebar; figures outside it are never read
    folder = tmp_path / "mine" / "a"
    folder.mkdir(parents=True)
    shutil.copy(reports[0].figures[0], folder / "fig.png")
    (folder / "report.md").write_text("# dpstudy report\n\nhello\n\n![fig](fig.png)\n\n"
                                      "![x](../../../etc/passwd.png)\n")
    at.text_input(key="results_folder").set_value(str(tmp_path / "mine")).run()
    assert [img.proto.imgs[0].caption for img in at.get("image")] == ["fig.png"]
    assert "not recorded" in " ".join(c.value for c in at.caption)
    at.text_input(key="results_folder").set_value(str(tmp_path / "nope")).run()
    assert f"results folder {tmp_path / 'nope'} does not exist" in at.error[0].value


# --- Overview, Masks, Frontier, Curves ----------------------------------------------

@pytest.mark.slow   # trains real models (the run_store / launched fixtures)
def test_overview_table_is_for_people(run_store, app_for):
    at = app_for(run_store)
    at.run()
    assert not at.exception
    table = shown_table(at.dataframe[0])
    assert list(table.columns) == ["status", "method", "model", "B-scan-level ε",
                                   "Dice (foreground)", "epochs", "duration", "run"]
    assert sorted(table["run"]) == sorted(os.listdir(run_store))
    rows = table.set_index("method")
    assert set(rows.index) == {"non-private", "DP-SGD", "Automatic Clipping"}
    assert rows.loc["non-private", "B-scan-level ε"] == "∞"
    assert rows.loc["DP-SGD", "model"] == "U-Net" and rows.loc["DP-SGD", "epochs"] == "1"
    assert float(rows.loc["DP-SGD", "B-scan-level ε"]) > 0
    assert {m.label: m.value for m in at.metric} == {"completed": "3"}

    at.toggle(key="all_columns").set_value(True).run()
    table = shown_table(at.dataframe[0]).set_index("method")
    assert table.loc["non-private", "clipping bound C"] == ""  # C means nothing there
    assert table.loc["non-private", "noise σ"] == "" and table.loc["DP-SGD", "noise σ"] == "1"
    assert at.dataframe[0].proto.placeholder == "–"  # how the browser draws a missing value
    assert table.loc["DP-SGD", "clipping bound C"] == "1"
    assert (table["membership AUC"] == "–").all()  # no audit yet: "–", never None/NaN
    assert not table.isin(["None", "nan", "NaN", "<NA>"]).any().any()
    at.multiselect(key="filter_method").set_value(["dp_sgd"]).run()
    assert shown_table(at.dataframe[0])["method"].tolist() == ["DP-SGD"]
    assert "synthetic" in at.dataframe[-1].value["data"].tolist()


@pytest.mark.slow   # trains real models (the run_store / launched fixtures)
def test_unfinished_runs_show_epochs_done_of_total(run_store, tmp_path, app_for):
    root = tmp_path / "runs"
    shutil.copytree(run_store, root)
    (dp_run,) = run_ids(root, "dp_sgd")
    config = root / dp_run / "config.json"
    meta = json.loads(config.read_text())
    meta["config"]["epochs"], meta["status"], meta["duration_s"] = 7, "cancelled", None
    config.write_text(json.dumps(meta))
    at = app_for(root)
    at.run()
    table = shown_table(at.dataframe[0]).set_index("run")
    assert table.loc[dp_run, "epochs"] == "1 of 7" and table.loc[dp_run, "duration"] == "–"
    assert at.dataframe[1].value["run"].tolist() == [dp_run]  # runs that did not finish


@pytest.mark.slow   # trains real models (the run_store / launched fixtures)
def test_masks_page_shows_image_truth_prediction_and_comparison(run_store, app_for):
    at = run_page(app_for(run_store), MASKS)
    (dp_run,), (np_run,) = run_ids(run_store, "dp_sgd"), run_ids(run_store, "non_dp")
    at.selectbox(key="run_a").set_value(dp_run).run()
    captions = [c.caption for img in at.get("image") for c in img.proto.imgs]
    assert captions[:2] == ["OCT B-scan", "ground truth"]
    assert any(c.startswith(f"A: prediction: {dp_run}") for c in captions)
    legend = next(m.value for m in at.markdown if "background" in m.value)
    assert "NFL" in legend and "agrees" not in legend
    dice = chart_data(at.get("vega_lite_chart")[0])
    assert len(dice) == 9 and set(dice["run"]) == {"A"}
    assert {label.split()[1] for label in dice["label"]} <= {"absent", "0"} | {
        f"{v:.2f}" for v in dice["dice"].dropna()}
    assert "absent" in at.caption[-1].value and "0" in at.caption[-1].value

    at.selectbox(key="run_b").set_value(np_run).run()
    at.toggle(key="only_errors").set_value(True).run()
    assert not at.exception
    captions = [c.caption for img in at.get("image") for c in img.proto.imgs]
    assert any(c.startswith(f"B: prediction (disagreements only): {np_run}") for c in captions)
    legend = next(m.value for m in at.markdown if "background" in m.value)
    assert "agrees with the truth (light grey" in legend
    chart = at.get("vega_lite_chart")[0]
    assert set(chart_data(chart)["run"]) == {"A", "B"}
    assert f"A: {dp_run}" in chart.proto.spec and f"B: {np_run}" in chart.proto.spec


@pytest.mark.slow   # trains real models (the run_store / launched fixtures)
def test_masks_and_curves_preselect_runs_from_a_link(run_store, app_for):
    (dp_run,), (ac_run,) = run_ids(run_store, "dp_sgd"), run_ids(run_store, "auto_clip")
    at = app_for(run_store)
    at.query_params["run"] = dp_run
    run_page(at, MASKS)
    assert at.selectbox(key="run_a").value == dp_run
    at.query_params["runs"] = f"{ac_run},{dp_run},not-a-run"
    run_page(at, CURVES)
    assert at.multiselect(key="curve_runs").value == [ac_run, dp_run]


@pytest.mark.slow   # trains real models (the run_store / launched fixtures)
def test_frontier_contains_every_dp_run(run_store, app_for):
    at = run_page(app_for(run_store), FRONTIER)
    frontier, by_sigma, by_epochs = at.get("vega_lite_chart")
    data = chart_data(frontier)
    dp = run_ids(run_store, "dp_sgd") + run_ids(run_store, "auto_clip")
    assert set(dp) < set(data["run_id"]) and (data.set_index("run_id").loc[dp, "epsilon"] > 0).all()
    assert '"type": "log"' in frontier.proto.spec and '"shape"' in frontier.proto.spec
    assert set(chart_data(by_epochs)["run_id"]) == set(dp)
    assert set(chart_data(by_sigma)["run_id"]) == set(dp)
    at.selectbox(key="metric").set_value("Dice: fluid").run()
    assert "val_dice_fluid" in at.get("vega_lite_chart")[0].proto.spec


@pytest.mark.slow   # trains real models (the run_store / launched fixtures)
def test_audited_runs_show_their_attack_auc_next_to_epsilon(run_store, tmp_path, app_for):
    from dpstudy.audit import audit_run
    root = tmp_path / "runs"
    shutil.copytree(run_store, root)
    dp = run_ids(root, "dp_sgd")
    audited = {run_id: audit_run(root, run_id, n_boot=20)["auc"] for run_id in dp}
    at = run_page(app_for(root), FRONTIER)
    audit = chart_data(at.get("vega_lite_chart")[3]).set_index("run_id")
    assert audit["mia_auc"].to_dict() == audited and (audit["epsilon"] > 0).all()
    assert "calibrated membership attack" in at.get("vega_lite_chart")[3].proto.spec
    at = run_page(app_for(root), OVERVIEW)
    at.toggle(key="all_columns").set_value(True).run()
    table = shown_table(at.dataframe[0]).set_index("run")
    assert table.loc[dp, "membership AUC"].tolist() == [f"{a:.3f}" for a in audited.values()]


@pytest.mark.slow   # trains real models (the run_store / launched fixtures)
def test_curves_overlay_runs_with_one_colour_per_run(run_store, app_for):
    at = run_page(app_for(run_store), CURVES)
    charts = at.get("vega_lite_chart")
    assert len(charts) == 5
    loss = chart_data(charts[0])
    assert set(loss["run_id"]) == set(os.listdir(run_store))
    assert set(loss["series"]) == {"training loss (diagnostic)", "validation loss"}
    scales = {json.dumps(json.loads(c.proto.spec)["layer"][0]["encoding"]["color"]["scale"])
              for c in charts}
    assert len(scales) == 1  # the ε chart (DP runs only) colours each run as the others do
    assert len(at.get("download_button")) == 5 * 3 + 2


@pytest.mark.slow   # trains real models (the run_store / launched fixtures)
def test_broken_and_interrupted_runs_never_break_a_page(run_store, tmp_path, app_for):
    root = tmp_path / "runs"
    shutil.copytree(run_store, root)
    (root / "broken-run").mkdir()
    (root / "broken-run" / "config.json").write_text("{not json")
    (dp_run,) = run_ids(root, "dp_sgd")
    config = root / dp_run / "config.json"
    config.write_text(config.read_text().replace('"status": "completed"', '"status": "running"'))
    at = app_for(root)
    for page, _, _ in PAGES:
        run_page(at, page)
    at.switch_page(OVERVIEW).run()
    problems = at.dataframe[1].value.set_index("run")
    assert problems.loc["broken-run", "status"] == "broken"
    assert "corrupt JSON" in problems.loc["broken-run", "error"]
    assert problems.loc[dp_run, "status"] == "interrupted"


def test_frontier_shows_one_data_source_at_a_time(tmp_path, monkeypatch):
    """Phantom pretraining runs must not appear as reference lines of a Duke frontier."""
    from _runs import write_run
    root = tmp_path / "runs"
    for run_id, method, data in [("a-dp", "dp_sgd", "/data/duke"), ("b-non", "non_dp", "/data/duke"),
                                 ("c-dp", "dp_sgd", "/data/duke"), ("d-pre", "non_dp", "synthetic")]:
        path = write_run(root, run_id) / "config.json"
        meta = json.loads(path.read_text())
        private = method != "non_dp"
        meta["config"].update(method=method, data=data, noise_multiplier=1.0 if private else None)
        meta.update(epsilon=3.0 if private else None, noise_multiplier=meta["config"]["noise_multiplier"])
        path.write_text(json.dumps(meta))
    monkeypatch.setenv("DPSTUDY_RUNS", str(root))
    at = AppTest.from_file(str(REPO / FRONTIER), default_timeout=60).run()
    assert not at.exception
    assert at.selectbox(key="data_source").value == "/data/duke"
    table = chart_data(at.get("vega_lite_chart")[0])
    assert set(table["run_id"]) == {"a-dp", "b-non", "c-dp"}


# --- the launch form -----------------------------------------------------------------

def test_form_defaults_are_the_quick_profiles_phantom_pretraining(tmp_path, app_for):
    """A first run that finishes in minutes and segments (0.76 foreground Dice in the
    committed results), with its estimated duration before it starts."""
    at = run_page(app_for(tmp_path / "runs"), LAUNCH)
    default = load_profile("quick", {"data": "synthetic"})[0][0]
    assert default.method == "non_dp" and default.data == "synthetic" and default.epochs == 40
    values = {k: w.value for k, w in widgets(at).items()}
    assert (values["model"], values["method"], values["epochs"], values["base_width"],
            values["depth"], values["height"]) == ("unet", "non_dp", 40, 8, 3, 128)
    assert at.info[0].value.startswith("**1 run**: about 3 min (from the study's timings")
    summary = next(r for r in load_reports()[1:2])  # the quick profile's report
    assert "| 2 | unet | non_dp |  | no | 40 | synthetic | pretraining | 1 | ∞ | 0.763" in \
        summary.blocks[0][1]


def test_fields_that_do_not_apply_are_hidden(tmp_path, app_for):
    at = run_page(app_for(tmp_path / "runs"), LAUNCH)
    privacy = {"noise_multiplier", "target_epsilon", "max_grad_norm", "by", "delta",
               "accountant", "clipping"}
    sparsification = {"final_rate", "refresh", "clip_fn"}
    assert not (privacy | sparsification | {"gamma"}) & set(widgets(at))  # non_dp
    fill(at, {"method": "dp_sgd"})
    assert {"noise_multiplier", "max_grad_norm", "delta", "accountant"} <= set(widgets(at))
    assert not (sparsification | {"gamma"}) & set(widgets(at))
    fill(at, {"method": "auto_clip"})
    assert "gamma" in widgets(at) and not sparsification & set(widgets(at))
    fill(at, {"method": "random_sparsification"})
    assert sparsification <= set(widgets(at)) and "gamma" not in widgets(at)
    fill(at, {"clip_fn": "automatic"})
    assert "gamma" in widgets(at)
    fill(at, {"by": "target B-scan-level ε"})
    assert "target_epsilon" in widgets(at) and "noise_multiplier" not in widgets(at)
    assert "momentum" not in widgets(at)
    fill(at, {"optimizer": "sgd"})
    assert "momentum" in widgets(at)
    assert "adapter_rank" not in widgets(at)
    fill(at, {"trainable": "adapters"})
    assert "adapter_rank" in widgets(at)


def test_the_form_expresses_every_run_config_field(tmp_path, app_for):
    """Generic: every RunConfig field has a CLI option the launcher uses, and a widget
    in the form (keyed by its name) once every method and option is chosen."""
    options = launcher.cli_options("train")
    fields = [f.name for f in dataclasses.fields(RunConfig)]
    assert set(fields) <= set(options), set(fields) - set(options)
    at = run_page(app_for(tmp_path / "runs"), LAUNCH)
    fill(at, {"mode": "grid of runs", "methods": list(METHODS), "clip_fn": "automatic",
              "optimizer": "sgd", "augment": True, "trainable": "adapters",
              "start_from": "from scratch"})
    keys = set(widgets(at))
    composite = {"image_size": {"height", "width"}, "data": {"source"},
                 "init_from": {"start_from"}, "model": {"models"}, "method": {"methods"},
                 "seed": {"seeds"}, "noise_multiplier": {"noise_values"},
                 "target_epsilon": {"by"}}
    missing = [f for f in fields if f not in keys and not composite.get(f, set()) <= keys]
    assert missing == []
    choices = launch_form.fields()["accountant"].choices
    assert tuple(widgets(at)["accountant"].options) == tuple(choices) == tuple(
        options["accountant"].choices)


def test_launch_arguments_reproduce_every_field():
    """``train_argv`` of a config with every field away from its default parses back
    (the CLI's own parser and config building) to the same run."""
    from dpstudy.cli import _base_fields
    cfg = RunConfig(model="nested_unet", method="random_sparsification", noise_multiplier=0.7,
                    base_width=4, depth=2, max_grad_norm=0.5, clipping="per_layer",
                    clip_fn="automatic", gamma=0.0, final_rate=0.5, refresh=2, delta=1e-6,
                    accountant="prv", grad_sample_mode="hooks", epochs=3, batch_size=4,
                    max_physical_batch=2, lr=1e-4, optimizer="sgd", momentum=0.8,
                    weight_decay=1e-4, lr_schedule="cosine", dice_weight=0.5, augment=True,
                    aug_multiplicity=2, image_size=(64, 32), data="-x; rm -rf /", limit=5,
                    audit_holdout=0.5, init_from="pre-run", seed=3, ema_decay=0.9,
                    trainable="adapters", adapter_rank=4, fluid_weight=2.0, normalisation="train_split",
                    randomness="os_entropy", device="cpu", audit_canaries=50,
                    audit_canary_images=20, tta="flip")
    assert {f.name for f in dataclasses.fields(cfg) if getattr(cfg, f.name) ==
            getattr(RunConfig(), f.name)} == {"target_epsilon", "privacy_unit"}
    # σ set instead; privacy_unit=subject excludes max_physical_batch: launched alone below
    argv = launcher.train_argv(cfg)
    assert "--data=-x; rm -rf /" in argv
    args = build_parser().parse_args(argv)
    back = RunConfig(model=args.model, method=args.method, seed=args.seed,
                     noise_multiplier=args.noise_multiplier,
                     target_epsilon=args.target_epsilon, **_base_fields(args))
    assert back == cfg
    unit = cfg.replace(privacy_unit="subject", max_physical_batch=None)
    args = build_parser().parse_args(launcher.train_argv(unit))
    assert RunConfig(model=args.model, method=args.method, seed=args.seed,
                     noise_multiplier=args.noise_multiplier, target_epsilon=args.target_epsilon,
                     **_base_fields(args)) == unit
    sweep = launcher.sweep_argv(cfg.replace(method="non_dp", noise_multiplier=None),
                                {"models": ["unet"], "methods": ["non_dp", "dp_sgd"],
                                 "noise_multipliers": [0.5, 1.0]}, jobs=2)
    assert sweep[:8] == ["sweep", "--models", "unet", "--methods", "non_dp", "dp_sgd",
                         "--noise-multipliers", "0.5"]
    assert "--max-grad-norm=0.5" in sweep and not any(a.startswith("--seed=") for a in sweep)
    with pytest.raises(ValueError, match="unknown grid axes"):
        launcher.sweep_argv(cfg, {"lrs": [1]})


def test_a_bad_data_folder_is_an_error_in_the_page_before_anything_starts(tmp_path, app_for):
    at = run_page(app_for(tmp_path / "runs"), LAUNCH)
    fill(at, {"source": "data folder", "data_path": str(tmp_path / "nope")})
    rc, _, err = main_cli(["train", "--data", str(tmp_path / "nope"), "--runs-dir",
                           str(tmp_path / "runs")])
    assert rc == 2 and at.error[0].value in err  # the trainer's own message
    assert at.button(key="start").disabled
    fill(at, {"source": "synthetic phantom", "height": 100})
    assert "not divisible by 8" in at.error[0].value and at.button(key="start").disabled
    assert not launcher.launches_dir(tmp_path / "runs").exists()


def main_cli(argv):
    """The CLI's ``main`` in this process, with its stderr."""
    import contextlib
    import io

    from dpstudy.cli import main
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = main(argv)
    return rc, "", err.getvalue()


def test_a_completed_run_is_refused_in_the_page(tmp_path, app_for):
    from _runs import write_run
    root = tmp_path / "runs"
    cfg = launch_form.DEFAULT.replace(method="dp_sgd", noise_multiplier=1.0, epochs=1,
                                      batch_size=2, image_size=(32, 32), base_width=8,
                                      depth=2, limit=4)
    write_run(root, cfg.run_id())  # a completed run with that id
    at = run_page(app_for(root), LAUNCH)
    fill(at, {**TINY_FORM, "method": "dp_sgd", "noise_multiplier": 1.0})
    assert at.info[0].value.startswith("**1 run, 1 of them already completed (skipped)**")
    at.button(key="start").click().run()
    assert "already completed" in at.error[0].value
    assert not launcher.launches_dir(root).exists()


@pytest.fixture
def started(monkeypatch) -> list:
    """What the form would launch, ``(args, options)`` per launch, instead of launching."""
    calls = []
    monkeypatch.setattr(launcher, "launch", lambda args, root, **kw: calls.append(
        (args, kw)) or {"id": "000001", "label": kw["label"]})
    return calls


def dry_run(args: list[str], root: Path) -> list[str]:
    """The run ids ``dpstudy <args> --dry-run`` lists (the CLI accepts the arguments)."""
    dry = subprocess.run([sys.executable, "-m", "dpstudy", *args, "--dry-run",
                          f"--runs-dir={root}"], capture_output=True, text=True,
                         env=one_thread_env())
    assert dry.returncode == 0, dry.stderr
    return dry.stdout.split()


def test_profile_mode_shows_size_and_time_and_launches_one_sweep(tmp_path, app_for, started):
    at = run_page(app_for(tmp_path / "runs"), LAUNCH)
    fill(at, {"mode": "study profile", "profile": "matched", "profile_source":
              "synthetic phantom", "jobs": 2})
    configs, _ = load_profile("matched", {"data": "synthetic"})
    assert at.info[0].value.startswith(f"**{len(configs)} runs**: about ")
    assert "with 2 at once" in at.info[0].value
    at.button(key="start").click().run()
    (args, kw), = started
    assert args == ["sweep", "--profile=matched", "--data=synthetic", "--jobs=2"]
    assert kw["run_ids"] == [c.run_id() for c in configs] and kw["estimate_s"] > 600


def test_pretraining_first_trains_a_phantom_run_before_the_private_one(tmp_path, app_for,
                                                                       started):
    at = run_page(app_for(tmp_path / "runs"), LAUNCH)
    fill(at, {**TINY_FORM, "method": "dp_sgd", "noise_multiplier": 1.0,
              "start_from": "pretrain on the phantom first", "pretrain_epochs": 2})
    assert at.info[0].value.startswith("**2 runs**")
    at.button(key="start").click().run()
    (args, kw), = started
    assert args[0] == "sweep" and args[1].startswith("--profile=")
    pre, private = dry_run(args, tmp_path)
    assert pre.startswith("unet-non_dp-") and private.startswith("unet-dp_sgd-sigma1-")
    assert kw["run_ids"] == [pre, private]
    pretraining, run = load_profile(args[1].split("=", 1)[1], {"data": "synthetic"})[0]
    assert run.init_from == pre and pretraining.epochs == 2 and run.epochs == 1


def test_grid_form_builds_a_sweep_the_cli_accepts(tmp_path, app_for, started):
    at = run_page(app_for(tmp_path / "runs"), LAUNCH)
    fill(at, {"mode": "grid of runs", "methods": ["non_dp", "dp_sgd", "auto_clip"],
              "noise_values": "1, 2", **TINY_FORM})
    assert at.info[0].value.startswith("**5 runs**")
    at.button(key="start").click().run()
    assert "Grid of 5 runs" in at.success[0].value
    (args, kw), = started
    assert args[:7] == ["sweep", "--models", "unet", "--methods", "non_dp", "dp_sgd", "auto_clip"]
    assert dry_run(args, tmp_path) == kw["run_ids"] and len(kw["run_ids"]) == 5
    fill(at, {"noise_values": "1, two"})
    assert "not a list of numbers" in at.error[0].value and at.button(key="start").disabled


# --- launches: real processes ----------------------------------------------------------

def test_launch_ids_are_a_sequence_that_sorts_in_launch_order(tmp_path):
    """``time-pid`` ids sorted by pid within a second (and 99999 after 100000); ids are
    now a sequence taken atomically, and older ids sort before every new one."""
    folder = launcher.launches_dir(tmp_path)
    folder.mkdir(parents=True)
    for launch_id, started in (("20261201-101010-99999", 2.0), ("20261201-101010-100000", 1.0)):
        (folder / f"{launch_id}.json").write_text(json.dumps(
            {"id": launch_id, "pid": 1, "start_time": None, "started": started, "argv": []}))
    got = []
    threads = [threading.Thread(target=lambda: got.append(launcher._next_id(folder)[1]))
               for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(got) == [f"{i:06d}" for i in range(1, 9)]
    for seq in range(1, 9):
        (folder / f"{seq:06d}.json").write_text(json.dumps(
            {"id": f"{seq:06d}", "seq": seq, "pid": 1, "start_time": None, "started": 0.0,
             "argv": []}))
    order = [r["id"] for r in launcher.list_launches(tmp_path)]
    assert order == [f"{i:06d}" for i in range(8, 0, -1)] + [
        "20261201-101010-99999", "20261201-101010-100000"]
    assert launcher._next_id(folder)[1] == "000009"


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    """Launches that run at once (they share the cores instead of queueing): a tiny DP
    run and a long run from the form, and a grid of two tiny runs."""
    root = tmp_path_factory.mktemp("launched")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DPSTUDY_RUNS", str(root))
        mp.setenv("OMP_NUM_THREADS", "1")
        at = AppTest.from_file(str(REPO / "streamlit_app.py"), default_timeout=60)
        run_page(at, LAUNCH)
        submitted = {}
        for name, values in (("tiny", {"method": "dp_sgd", "noise_multiplier": 1.0}),
                             ("long", {"method": "non_dp", "epochs": 500}),
                             ("grid", {"mode": "grid of runs", "methods": ["non_dp"],
                                       "seeds": "1, 2"})):
            fill(at, {**TINY_FORM, **values})
            at.button(key="start").click().run()
            assert "Started: " in at.success[0].value, [e.value for e in at.error]
            submitted[name] = launcher.list_launches(root)[0]
        try:
            yield {"at": at, "root": root, **submitted}
        finally:
            for record in launcher.list_launches(root):
                if record["alive"]:  # a failed test leaves no training behind
                    os.killpg(record["pid"], signal.SIGKILL)


@pytest.fixture
def launches(launched, monkeypatch):
    """``launched``, with its store set again for the app (conftest unsets it per test)."""
    monkeypatch.setenv("DPSTUDY_RUNS", str(launched["root"]))
    return launched


@pytest.mark.slow   # trains real models (the run_store / launched fixtures)
def test_a_launched_run_finishes_with_its_results_and_links(launches):
    at, root = launches["at"], launches["root"]
    record = launches["tiny"]
    assert record["argv"][1:4] == ["-m", "dpstudy", "train"]
    assert "--method=dp_sgd" in record["argv"] and record["estimate_s"] > 0
    (run_id,) = record["run_ids"]
    assert run_id.startswith("unet-dp_sgd-sigma1-")
    wait_for(lambda: "· completed" in card(at, record), at, LONG)
    assert RunStore(root).is_completed(run_id)
    assert launcher.state(launch_record(root, record["id"])) == ("completed", "")
    box = card_box(at, record)
    results = box.get("dataframe")[0].value.set_index("run")
    final = RunStore(root).list_runs().set_index("run_id").loc[run_id]
    assert results.loc[run_id, "status"] == "completed"
    assert results.loc[run_id, "B-scan-level ε"] == f"{final['epsilon']:.3g}"
    assert results.loc[run_id, "Dice (foreground)"] == pytest.approx(final["val_dice_fg_mean"])
    links = {link.proto.page: link.proto.query_string for link in box.get("page_link")}
    assert any(p.endswith("masks") and run_id in q for p, q in links.items())
    assert any(p.endswith("curves") and run_id in q for p, q in links.items())
    assert not [b for b in box.button if b.key.startswith("cancel")]


def test_the_run_listing_sees_a_rewrite_within_one_timestamp_tick(tmp_path):
    """A trainer's last two writes may share an mtime (coarse file-system clocks): the
    cached listing must still see the second, or a finished run shows stale results."""
    from _runs import write_run
    from dpstudy import ui
    from dpstudy.store import atomic_write_json
    config = write_run(tmp_path, "a-run", epsilon=1.5) / "config.json"
    before, stamp = ui.signature(tmp_path), config.stat().st_mtime_ns
    atomic_write_json(config, {**json.loads(config.read_text()), "epsilon": 2.5})
    os.utime(config, ns=(stamp, stamp))
    assert ui.signature(tmp_path) != before


@pytest.mark.slow   # trains real models (the run_store / launched fixtures)
def test_a_grid_shows_run_k_of_n(launches):
    at, root, record = launches["at"], launches["root"], launches["grid"]
    assert len(record["run_ids"]) == 2 and record["label"] == "Grid of 2 runs"
    texts = set()

    def progress_seen():
        box = card_box(at, record)
        if box is not None:
            texts.update(p.proto.text for p in box.get("progress"))
        return not launch_record(root, record["id"])["alive"]
    wait_for(progress_seen, at, LONG)
    assert any(t.startswith("run 1 of 2") or t.startswith("run 2 of 2") for t in texts), texts
    assert launcher.state(launch_record(root, record["id"]))[0] == "completed"


@pytest.mark.slow   # trains real models (the run_store / launched fixtures)
def test_one_cancel_control_per_process_and_cancelled_in_words(launches):
    at, root, record = launches["at"], launches["root"], launches["long"]
    assert "--epochs=500" in record["argv"]
    (run_id,) = record["run_ids"]
    store = RunStore(root)
    wait_for(lambda: store.path(run_id).exists() and
             store.read_meta(run_id)["status"] == "running", at, LONG)
    at.run()
    cancels = [b.key for b in at.button if "cancel" in b.key]
    assert f"cancel-launch-{record['id']}" in cancels
    assert not [k for k in cancels if k.startswith("cancel-run-")]  # the launch's run: none
    at.button(key=f"cancel-launch-{record['id']}").click().run()
    wait_for(lambda: "· cancelled" in card(at, record), at, LONG)
    assert store.read_meta(run_id)["status"] == "cancelled"
    assert "cancelled by SIGTERM" in store.read_meta(run_id)["error"]


def test_a_launch_that_fails_says_why_in_words(tmp_path):
    """A data path full of shell syntax reaches the trainer as one argument (no shell),
    which refuses it; the launch reads "failed" with the trainer's own message."""
    marker = tmp_path / "pwned"
    path = f"synthetic; touch {marker}"
    cfg = RunConfig(data=path, **{k: v for k, v in launch_form.DEFAULT.to_dict().items()
                                  if k not in ("data",)})
    record = launcher.launch(launcher.train_argv(cfg), tmp_path / "runs", label="bad")
    assert f"--data={path}" in record["argv"]
    done = wait_for(lambda: not launch_record(tmp_path / "runs", record["id"])["alive"],
                    timeout=LONG) and launch_record(tmp_path / "runs", record["id"])
    state, reason = launcher.state(done)
    assert (state, done["returncode"]) == ("failed", 2)
    assert reason.startswith(f"data folder {Path(path).resolve()} does not exist")
    assert not marker.exists()


@pytest.mark.slow   # trains real models (the run_store / launched fixtures)
def test_evaluation_and_audit_start_from_the_overview(run_store, tmp_path, app_for):
    root = tmp_path / "runs"
    shutil.copytree(run_store, root)
    (dp_run,) = run_ids(root, "dp_sgd")
    at = app_for(root)
    at.run()
    at.selectbox(key="action_run").set_value(dp_run).run()
    at.selectbox(key=f"overview-split-{dp_run}").set_value("test").run()
    at.button(key=f"overview-evaluate-{dp_run}").click().run()
    assert "Evaluation of" in at.success[0].value
    (evaluation,) = launcher.list_launches(root)
    assert evaluation["argv"][3:6] == ["evaluate", dp_run, "--split=test"]
    at.button(key=f"overview-audit-{dp_run}").click().run()
    audit = launcher.list_launches(root)[0]
    assert audit["argv"][3:5] == ["audit", dp_run] and audit["label"].startswith(
        "Membership audit")
    done = wait_for(lambda: not launch_record(root, evaluation["id"])["alive"]
                    and launch_record(root, evaluation["id"]), timeout=LONG)
    assert launcher.state(done) == ("completed", "")
    assert f"Scored 4 images of run {dp_run}: the 'test' split" in launcher.log_tail(done, 50)
    wait_for(lambda: not launch_record(root, audit["id"])["alive"], timeout=LONG)
    at.switch_page(LAUNCH).run()
    assert "Scored 4 images" in " ".join(c.value for c in at.code)


# --- estimates -------------------------------------------------------------------------

def test_estimates_are_calibrated_on_the_store_and_ignore_smoke_runs():
    from dpstudy import estimate
    cfg = launch_form.DEFAULT  # 66 + 22 phantom scans at 128², width 8: one reference epoch
    assert estimate.epoch_units(cfg, 66, 22) == pytest.approx(1.0)
    meta = {"config": cfg.to_dict(), "status": "completed", "epochs_done": 40,
            "duration_s": 400.0, "data": {"n_train": 66, "n_val": 22}}
    tiny = {**meta, "config": {**cfg.to_dict(), "image_size": [32, 32], "limit": 4},
            "duration_s": 100.0, "data": {"n_train": 4, "n_val": 4}}
    failed = {**meta, "status": "failed", "duration_s": 1.0}
    est = estimate.calibrate([meta, tiny, failed, {"config": {"unknown": 1}}])
    assert est.rates[("unet", False)] == pytest.approx(10.0)  # 400 s / 40 reference epochs
    assert est.rates[("unet", True)] == estimate.PRIOR_S[("unet", True)]
    phantom_start = estimate.START_S + estimate.PHANTOM_S_PER_SCAN * (66 + 2 * 22)
    assert est.seconds(cfg, 66, 22) == pytest.approx(phantom_start + 400.0)
    assert est.basis([cfg]).startswith("calibrated on 1 completed run of the same kind")
    assert "study's timings" in est.basis([cfg.replace(method="dp_sgd", noise_multiplier=1.0)])
    # waves run one after the other; within one, each worker takes the next run when free
    assert estimate.makespan([[10.0], [10.0, 10.0, 10.0]], jobs=2) == 30.0
    assert estimate.duration_text(200) == "about 3 min"


def test_a_run_of_the_same_architecture_is_the_yardstick_where_one_exists():
    from dpstudy import estimate
    small = launch_form.DEFAULT           # width 8: one reference epoch per epoch
    wide = small.replace(base_width=16, depth=4)
    meta = {"config": small.to_dict(), "status": "completed", "epochs_done": 10,
            "duration_s": 100.0, "data": {"n_train": 66, "n_val": 22}}
    est = estimate.calibrate([meta])
    # no wide run yet: the width-8 rate, scaled by the measured width exponent
    assert est.seconds(wide, 66, 22) - est.seconds(small, 66, 22) == pytest.approx(
        small.epochs * (2 ** estimate.WIDTH_EXPONENT - 1) * 10.0)
    wide_meta = {**meta, "config": wide.to_dict(), "duration_s": 175.0}   # 1.75× width 8
    est = estimate.calibrate([meta, wide_meta])
    assert est.seconds(wide, 66, 22) - est.seconds(small, 66, 22) == pytest.approx(
        small.epochs * (1.75 - 1) * 10.0)
    assert est.basis([wide]).startswith("calibrated on 1 completed run")
    assert est.rates[("unet", False)] == pytest.approx(
        (10.0 + 175.0 / (10 * 2 ** estimate.WIDTH_EXPONENT)) / 2)


def test_remaining_time_trains_pretraining_first():
    from dpstudy import estimate
    pre = launch_form.DEFAULT
    runs = [pre.replace(method="dp_sgd", noise_multiplier=s, init_from=pre.run_id())
            for s in (1.0, 2.0, 3.0)]
    est = estimate.Estimator()
    each = {c.run_id(): est.seconds(c, 66, 22) for c in (pre, *runs)}
    # wave 1: the pretraining alone; wave 2: three runs on two workers → two run lengths
    assert estimate.remaining_seconds(est, [pre, *runs], jobs=2) == pytest.approx(
        each[pre.run_id()] + 2 * each[runs[0].run_id()])
    # once the pretraining and one run are done, the other two run side by side
    assert estimate.remaining_seconds(est, runs[1:], jobs=2) == pytest.approx(
        each[runs[1].run_id()])


def test_a_phantom_spec_is_sized_by_its_own_scan_count(tmp_path):
    from dpstudy import estimate
    # the best profile's pretraining data: 600 training scans, not an empty folder
    assert estimate.data_sizes("synthetic:n=600,dr=1") == (600, 22)
    assert estimate.data_sizes("synthetic") == (66, 22)
    assert estimate.data_sizes("synthetic:n=600", limit=8) == (8, 8)
    pre = launch_form.DEFAULT.replace(data="synthetic:n=600,dr=1")
    est = estimate.Estimator()
    # the phantom is generated (once) before training: a start cost per generated scan
    assert est.seconds(pre, 600, 22) == pytest.approx(
        estimate.START_S + estimate.PHANTOM_S_PER_SCAN * (600 + 2 * 22)
        + pre.epochs * estimate.epoch_units(pre, 600, 22) * est.rates[("unet", False)])
    (tmp_path / "train" / "images").mkdir(parents=True)
    assert estimate.data_sizes(str(tmp_path)) == (0, 0)
