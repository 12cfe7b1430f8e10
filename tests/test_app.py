"""The Streamlit app through ``AppTest``, against a store of real tiny trainings."""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pytest
from streamlit.testing.v1 import AppTest

from dpstudy import launcher
from dpstudy.store import RunStore

REPO = Path(__file__).resolve().parents[1]
TINY = ["--data", "synthetic", "--limit", "4", "--batch-size", "2", "--image-size", "32", "32",
        "--base-width", "8", "--depth", "2", "--epochs", "1", "--quiet"]
RUNS = {"non_dp": ["--method", "non_dp"],
        "dp_sgd": ["--method", "dp_sgd", "--noise-multiplier", "1"],
        "auto_clip": ["--method", "auto_clip", "--noise-multiplier", "2"]}
MAIN = "streamlit_app.py"  # the Overview page
LAUNCH, MASKS, FRONTIER, CURVES = (f"pages/{page}.py" for page in
                                   ("1_Launch", "2_Masks", "3_Frontier", "4_Curves"))
PAGES = (MAIN, LAUNCH, MASKS, FRONTIER, CURVES)
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
        _, err = proc.communicate(timeout=240)
        assert proc.returncode == 0, err
    return root


@pytest.fixture
def app_for(monkeypatch):
    """An AppTest of the app on a given store."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")

    def make(root: Path) -> AppTest:
        monkeypatch.setenv("DPSTUDY_RUNS", str(root))
        return AppTest.from_file(str(REPO / "streamlit_app.py"), default_timeout=30)
    return make


def run_page(at: AppTest, page: str) -> AppTest:
    at.switch_page(page).run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def chart_data(chart):
    """The DataFrame a vega_lite_chart element carries (Arrow IPC)."""
    (dataset,) = chart.proto.datasets
    return pa.ipc.open_stream(dataset.data.data).read_all().to_pandas()


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


def run_of(root: Path, record: dict, epochs: int):
    """The completed-or-running run of a launch; fails at once, with the launch's output,
    if the process died without training."""
    store = RunStore(root)
    runs = [r for r in store.run_ids() if store.read_meta(r)["config"]["epochs"] == epochs]
    (record,) = [r for r in launcher.list_launches(root) if r["id"] == record["id"]]
    if not runs and not record["alive"]:
        raise AssertionError(f"launch exited ({record['returncode']}):\n"
                             f"{launcher.log_tail(record)}")
    return runs


def fill(at: AppTest, values: dict) -> None:
    """Set the launch form's fields by widget key."""
    widgets = [w for kind in ("text_input", "number_input", "selectbox", "multiselect", "radio")
               for w in at.sidebar.get(kind)]
    for key, value in values.items():
        (match,) = [w for w in widgets if w.key == key]
        match.set_value(value)


@pytest.mark.slow
def test_overview_lists_runs_and_counts(run_store, app_for):
    at = app_for(run_store)
    at.run()
    assert not at.exception
    table = at.dataframe[0].value
    assert sorted(table["run_id"]) == sorted(os.listdir(run_store))
    assert set(table["method"]) == set(RUNS)
    assert {m.label: m.value for m in at.metric} == {"completed": "3"}
    assert "synthetic" in at.dataframe[-1].value["data"].tolist()
    at.multiselect[1].set_value(["dp_sgd"]).run()
    assert at.dataframe[0].value["method"].tolist() == ["dp_sgd"]


def test_layout_is_folder_based_multipage():
    """``streamlit_app.py`` plus ``pages/``, sorted as the sidebar lists them; no
    ``st.navigation`` (with a ``pages/`` folder it breaks first requests to page URLs)
    and no Material icons (fetched from outside)."""
    assert sorted(p.name for p in (REPO / "pages").iterdir() if p.suffix == ".py") == \
        [Path(page).name for page in PAGES[1:]]
    for page in PAGES:
        source = (REPO / page).read_text()
        assert "st.navigation(" not in source and "st.Page(" not in source, page
        assert ":material/" not in source, page
        assert "from dpstudy.ui import" in source and "page_config(" in source, page
    assert not (REPO / "app_pages").exists()


def test_empty_store_explains_how_to_start(tmp_path, app_for):
    at = app_for(tmp_path / "none")
    for page in PAGES[2:]:  # every page that reads runs points to Launch
        run_page(at, page)
        assert "dpstudy train" in at.info[0].value
        assert [link.proto.page for link in at.get("page_link")] == ["Launch"]
    run_page(at, LAUNCH)
    assert at.title[0].value == "Launch and follow runs"
    at.switch_page(MAIN).run()
    assert "empty" in at.info[0].value and "dpstudy train" in at.info[0].value
    assert at.title[0].value == "Runs"


@pytest.mark.slow
def test_masks_page_shows_image_truth_prediction_and_comparison(run_store, app_for):
    at = run_page(app_for(run_store), MASKS)
    (dp_run,), (np_run,) = run_ids(run_store, "dp_sgd"), run_ids(run_store, "non_dp")
    at.selectbox(key="run_a").set_value(dp_run).run()
    captions = [c.caption for img in at.get("image") for c in img.proto.imgs]
    assert captions[:2] == ["OCT B-scan", "ground truth"]
    assert any(c.startswith(f"prediction: {dp_run}") for c in captions)
    dice = chart_data(at.get("vega_lite_chart")[0])
    assert len(dice) == 9 and set(dice["run"]) == {dp_run}

    at.selectbox(key="run_b").set_value(np_run).run()
    at.toggle(key="only_errors").set_value(True).run()
    assert not at.exception
    captions = [c.caption for img in at.get("image") for c in img.proto.imgs]
    assert any(c.startswith(f"prediction (disagreements only): {np_run}") for c in captions)
    assert set(chart_data(at.get("vega_lite_chart")[0])["run"]) == {dp_run, np_run}


@pytest.mark.slow
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


@pytest.mark.slow
def test_audited_runs_show_their_attack_auc_next_to_epsilon(run_store, tmp_path, app_for):
    from dpstudy.audit import audit_run
    root = tmp_path / "runs"
    shutil.copytree(run_store, root)
    dp = run_ids(root, "dp_sgd")
    audited = {run_id: audit_run(root, run_id, n_boot=20)["auc"] for run_id in dp}
    at = run_page(app_for(root), FRONTIER)
    audit = chart_data(at.get("vega_lite_chart")[3]).set_index("run_id")
    assert audit["mia_auc"].to_dict() == audited and (audit["epsilon"] > 0).all()
    assert "loss-threshold attack" in at.get("vega_lite_chart")[3].proto.spec
    at = run_page(app_for(root), MAIN)
    table = at.dataframe[0].value.set_index("run_id")
    assert table.loc[dp, "mia_auc"].to_dict() == audited
    assert table["mia_auc"].isna().sum() == len(table) - len(dp)


@pytest.mark.slow
def test_curves_overlay_runs(run_store, app_for):
    at = run_page(app_for(run_store), CURVES)
    charts = at.get("vega_lite_chart")
    assert len(charts) == 5
    loss = chart_data(charts[0])
    assert set(loss["run_id"]) == set(os.listdir(run_store))
    assert set(loss["series"]) == {"train_loss", "val_loss"}
    assert len(at.get("download_button")) == 5 * 3 + 2


@pytest.mark.slow
def test_broken_and_interrupted_runs_never_break_a_page(run_store, tmp_path, app_for):
    root = tmp_path / "runs"
    shutil.copytree(run_store, root)
    (root / "broken-run").mkdir()
    (root / "broken-run" / "config.json").write_text("{not json")
    (dp_run,) = run_ids(root, "dp_sgd")
    config = root / dp_run / "config.json"
    config.write_text(config.read_text().replace('"status": "completed"', '"status": "running"'))
    at = app_for(root)
    for page in PAGES:
        run_page(at, page)
    at.switch_page(MAIN).run()
    problems = at.dataframe[1].value.set_index("run_id")
    assert problems.loc["broken-run", "status"] == "broken"
    assert "corrupt JSON" in problems.loc["broken-run", "error"]
    assert problems.loc[dp_run, "status"] == "interrupted"


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    """Three launches from the form at once (they share the cores instead of queueing):
    a tiny DP run, a data path full of shell syntax, and a long run to cancel."""
    root, marker = tmp_path_factory.mktemp("launched"), tmp_path_factory.mktemp("m") / "pwned"
    path = f"synthetic; touch {marker}"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DPSTUDY_RUNS", str(root))
        mp.setenv("OMP_NUM_THREADS", "1")
        at = AppTest.from_file(str(REPO / "streamlit_app.py"), default_timeout=30)
        run_page(at, LAUNCH)
        submitted = {}
        for name, values in (("tiny", {"method": "dp_sgd", "sigma": 1.0}),
                             ("shell", {"method": "non_dp", "source": "folder",
                                        "data_path": path}),
                             ("long", {"source": "synthetic", "epochs": 500})):
            fill(at, {**TINY_FORM, **values})
            at.button(key="start").click().run()
            assert "Started a run" in at.sidebar.success[0].value
            submitted[name] = launcher.list_launches(root)[0]
        try:
            yield {"at": at, "root": root, "marker": marker, "path": path, **submitted}
        finally:
            for record in launcher.list_launches(root):
                if record["alive"]:  # a failed test leaves no training behind
                    os.killpg(record["pid"], signal.SIGKILL)


@pytest.fixture
def launches(launched, monkeypatch):
    """``launched``, with its store set again for the app (conftest unsets it per test)."""
    monkeypatch.setenv("DPSTUDY_RUNS", str(launched["root"]))
    return launched


@pytest.mark.slow
def test_form_starts_a_real_training(launches):
    at, store = launches["at"], RunStore(launches["root"])
    assert launches["tiny"]["argv"][1:4] == ["-m", "dpstudy", "train"]
    assert "--method=dp_sgd" in launches["tiny"]["argv"]
    (run_id,) = wait_for(lambda: [r for r in run_of(launches["root"], launches["tiny"], 1)
                                  if store.is_completed(r)], at)
    assert run_id.startswith("unet-dp_sgd-sigma1-")
    wait_for(lambda: any(launches["tiny"]["id"] in e.label and "exited with status 0" in e.label
                         for e in at.expander), at, 10)


@pytest.mark.slow
def test_shell_metacharacters_reach_the_trainer_as_one_argument(launches):
    assert f"--data={launches['path']}" in launches["shell"]["argv"]
    shell_id = launches["shell"]["id"]
    record = wait_for(lambda: next((r for r in launcher.list_launches(launches["root"])
                                    if r["id"] == shell_id and not r["alive"]), None),
                      timeout=60)
    assert record["returncode"] == 2  # the trainer's one-line input error
    assert launches["path"] in launcher.log_tail(record)
    assert not launches["marker"].exists()
    store = RunStore(launches["root"])
    assert launches["path"] not in [store.read_meta(r)["config"]["data"]
                                    for r in store.run_ids()]


@pytest.mark.slow
def test_cancel_button_stops_a_running_training(launches):
    at, store = launches["at"], RunStore(launches["root"])
    assert "--epochs=500" in launches["long"]["argv"]
    (run_id,) = wait_for(lambda: run_of(launches["root"], launches["long"], 500), at, 60)
    wait_for(lambda: [b for b in at.button if b.key == f"cancel-run-{run_id}"], at, 30)
    at.button(key=f"cancel-run-{run_id}").click().run()
    status = wait_for(lambda: store.read_meta(run_id)["status"] != "running"
                      and store.read_meta(run_id)["status"], at, 30)
    assert status == "cancelled"
    assert "cancelled by SIGTERM" in store.read_meta(run_id)["error"]


def test_grid_form_builds_a_sweep_the_cli_accepts(tmp_path, app_for, monkeypatch):
    started = []
    monkeypatch.setattr(launcher, "launch", lambda args, root: started.append(args) or {"pid": 1})
    at = run_page(app_for(tmp_path / "runs"), LAUNCH)
    at.toggle(key="grid").set_value(True).run()
    fill(at, {"methods": ["non_dp", "dp_sgd", "auto_clip"], "noise_values": "1, 2",
              **TINY_FORM})
    at.button(key="start").click().run()
    assert "a grid of 5 runs" in at.sidebar.success[0].value
    (args,) = started
    assert args[:7] == ["sweep", "--models", "unet", "--methods", "non_dp", "dp_sgd", "auto_clip"]
    dry = subprocess.run([sys.executable, "-m", "dpstudy", *args, "--dry-run",
                          f"--runs-dir={tmp_path}"], capture_output=True, text=True)
    assert dry.returncode == 0, dry.stderr
    assert len(dry.stdout.split()) == 5
    fill(at, {"noise_values": "1, two"})
    at.button(key="start").click().run()
    assert "not a list of numbers" in at.sidebar.error[0].value and len(started) == 1


def test_argument_lists_keep_values_whole():
    from dpstudy.config import RunConfig
    cfg = RunConfig(method="dp_sgd", noise_multiplier=1.0, data="-x; rm -rf /", lr=1e-3)
    argv = launcher.train_argv(cfg)
    assert "--data=-x; rm -rf /" in argv and "--noise-multiplier=1.0" in argv
    assert "--lr=0.001" in argv and "--init-from" not in " ".join(argv)
    sweep = launcher.sweep_argv(cfg, {"models": ["unet"], "methods": ["non_dp", "dp_sgd"],
                                      "noise_multipliers": [0.5, 1.0]}, jobs=2)
    assert sweep[:8] == ["sweep", "--models", "unet", "--methods", "non_dp", "dp_sgd",
                         "--noise-multipliers", "0.5"]
    with pytest.raises(ValueError, match="unknown grid axes"):
        launcher.sweep_argv(cfg, {"lrs": [1]})


def test_frontier_shows_one_data_source_at_a_time(tmp_path, monkeypatch):
    """Phantom pretraining runs must not appear as reference lines of a Duke frontier."""
    import json

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
    at = AppTest.from_file(str(REPO / "pages/3_Frontier.py"), default_timeout=60).run()
    assert not at.exception
    assert at.selectbox(key="data_source").value == "/data/duke"
    table = chart_data(at.get("vega_lite_chart")[0])
    assert set(table["run_id"]) == {"a-dp", "b-non", "c-dp"}
