"""Profiles with public pretraining, and the report of the store they produce."""

import struct

import numpy as np
import pandas as pd
import pytest
from _runs import TINY, main, make_duke

from dpstudy.audit import audit_run
from dpstudy.config import RunConfig
from dpstudy.errors import ConfigError
from dpstudy.report import summarise, write_report
from dpstudy.store import RunStore, RunWriter
from dpstudy.sweep import load_profile, run_sweep
from dpstudy.train import train

PROFILE = """
[base]
limit = 6
image_size = [32, 32]
base_width = 8
depth = 2
epochs = 2
batch_size = 2

[pretrain]
epochs = 1

[[grid]]
model = ["unet"]
method = ["dp_sgd"]
noise_multiplier = [1.0]
seed = [0, 1]
pretrained = true

[[grid]]
model = ["unet"]
method = ["non_dp", "auto_clip"]
noise_multiplier = [2.0]
"""
REQUIRED = ["model", "method", "noise_multiplier", "max_grad_norm", "target_epsilon", "epsilon",
            "n_seeds", "val_dice_fg_mean", "val_dice_fg_std", "val_dice_all_mean", "mia_auc"]


def png_size(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """A store trained from a profile, partly audited, with a failed and a broken run."""
    root = tmp_path_factory.mktemp("runs")
    path = root.parent / "tiny.toml"
    path.write_text(PROFILE)
    configs, _ = load_profile(str(path), overrides={"data": "synthetic"})
    results = run_sweep(configs, root, progress=False)
    assert {r["status"] for r in results} == {"completed"}, results
    store = RunStore(root)
    dp = [c.run_id() for c in configs if c.method == "dp_sgd"]
    for run_id in dp:
        audit_run(root, run_id, n_boot=20)
    RunWriter(store, "unet-failed-run", {"config": configs[1].to_dict()}).finish("failed", "boom")
    (root / "broken-run").mkdir()
    (root / "broken-run" / "config.json").write_text("{")
    return root, configs, dp


@pytest.mark.slow
def test_pretraining_runs_come_first_and_finish_before_their_dependents(study):
    root, configs, _ = study
    store = RunStore(root)
    pre = configs[0]
    assert pre.data == "synthetic" and pre.method == "non_dp" and pre.epochs == 1
    dependents = [c for c in configs if c.init_from]
    assert len(dependents) == 2 and {c.init_from for c in dependents} == {pre.run_id()}
    assert all(c.init_from is None for c in configs if c.method != "dp_sgd")
    finished = store.read_meta(pre.run_id())["updated"]
    assert all(store.read_meta(c.run_id())["created"] >= finished for c in dependents)


def test_overrides_win_except_the_public_data_of_pretraining(tmp_path):
    path = tmp_path / "p.toml"
    path.write_text(PROFILE)
    configs, _ = load_profile(str(path), overrides={"data": "/duke", "epochs": 5})
    assert configs[0].data == "synthetic" and all(c.epochs == 5 for c in configs)
    assert all(c.data == "/duke" for c in configs[1:])
    assert all(c.init_from in (None, configs[0].run_id()) for c in configs)
    reseeded, _ = load_profile(str(path), seeds=[3, 4])      # --seeds: every grid, not pretraining
    assert reseeded[0].seed == configs[0].seed and len(reseeded) == 1 + 2 + 2 * 2   # pre, dp_sgd, 2 methods
    assert {c.seed for c in reseeded[1:]} == {3, 4}
    path.write_text(PROFILE.replace("[pretrain]\nepochs = 1\n", ""))
    with pytest.raises(ConfigError, match="no \\[pretrain\\] table"):
        load_profile(str(path))
    path.write_text(PROFILE.replace("pretrained = true", "pretrained = 'yes'"))
    with pytest.raises(ConfigError, match="pretrained"):
        load_profile(str(path))
    # pretraining for private runs must be public, and from scratch
    path.write_text(PROFILE.replace("[pretrain]\nepochs = 1\n",
                                    "[pretrain]\nepochs = 1\ndata = '/duke'\n"))
    with pytest.raises(ConfigError, match="\\[pretrain\\]: data='/duke' is not public"):
        load_profile(str(path))
    path.write_text(PROFILE.replace("[pretrain]\nepochs = 1\n",
                                    "[pretrain]\nepochs = 1\ninit_from = 'some-run'\n"))
    with pytest.raises(ConfigError, match="init_from='some-run'"):
        load_profile(str(path))


@pytest.mark.slow
def test_summary_has_one_row_per_configuration_with_seed_statistics(study, tmp_path):
    root, configs, dp = study
    write_report(root, tmp_path)
    summary = pd.read_csv(tmp_path / "summary.csv")
    assert set(REQUIRED) <= set(summary.columns)
    assert len(summary) == 4 and sorted(summary["n_seeds"]) == [1, 1, 1, 2]
    runs = RunStore(root).list_runs().set_index("run_id")
    row = summary[summary["method"] == "dp_sgd"].iloc[0]
    dice = runs.loc[dp, "val_dice_fg_mean"]
    assert row["val_dice_fg_mean"] == pytest.approx(dice.mean())
    assert row["val_dice_fg_std"] == pytest.approx(dice.std())
    assert row["mia_auc"] == pytest.approx(runs.loc[dp, "mia_auc"].mean())
    assert row["epsilon"] == pytest.approx(runs.loc[dp[0], "epsilon"])
    assert row["noise_multiplier"] == 1.0 and pd.isna(row["target_epsilon"])
    pre = summary[summary["pretraining"]]
    assert pre["run_ids"].tolist() == [configs[0].run_id()]
    assert summary["mia_auc"].notna().sum() == 1
    meta = RunStore(root).read_meta(dp[0])["audit"]
    assert meta["reference"] == f"run {configs[0].run_id()}"     # the pretraining weights
    assert row["mia_reference_auc"] == pytest.approx(np.mean(
        [RunStore(root).read_meta(r)["audit"]["reference_auc"] for r in dp]))


@pytest.mark.slow
def test_report_writes_tables_figures_and_lists_the_excluded_runs(study, tmp_path, capsys):
    root, _, _ = study
    rc, out, err = main(capsys, "report", str(root), "--out", str(tmp_path))
    assert rc == 0, err
    written = {p.split("/")[-1] for p in out.split()}
    assert {"summary.csv", "table.csv", "table.md", "report.md"} <= written
    for stem in ("frontier_unet", "curves", "dice_vs_sigma", "audit_auc"):
        width, height = png_size(tmp_path / f"{stem}.png")
        assert width > 200 and height > 100
        assert len(pd.read_csv(tmp_path / f"{stem}.csv"))
    table = (tmp_path / "table.md").read_text()
    assert table.count("\n") == 2 + 4 and "±" in table
    report = (tmp_path / "report.md").read_text()
    assert "unet-failed-run" in report and "boom" in report and "broken-run" in report
    curves = pd.read_csv(tmp_path / "curves.csv")
    assert set(curves["epoch"]) == {1, 2}
    frontier = pd.read_csv(tmp_path / "frontier_unet.csv").set_index("method")
    two_seeds = frontier.loc["dp_sgd"]          # the only configuration with 2 seeds
    assert two_seeds["upper"] - two_seeds["lower"] == pytest.approx(
        2 * two_seeds["val_dice_fg_std"]) and two_seeds["val_dice_fg_std"] > 0
    assert frontier.loc["auto_clip", ["lower", "upper"]].isna().all()   # one seed: no bar


def test_report_of_an_empty_store(tmp_path):
    paths = write_report(tmp_path / "none", tmp_path / "out")
    assert not any(p.suffix == ".png" for p in paths)
    assert "model" in (tmp_path / "out" / "summary.csv").read_text()


@pytest.mark.slow
def test_seeds_are_grouped_by_data_content_not_by_path_spelling(tmp_path, monkeypatch):
    data = make_duke(tmp_path / "duke")
    monkeypatch.chdir(tmp_path)
    fields = {**TINY, "limit": None}
    for seed, spelling in ((0, str(data)), (1, "duke"), (2, "./duke/")):
        train(RunConfig(**{**fields, "data": spelling, "seed": seed}), tmp_path / "runs",
              progress=False, log=lambda *_: None)
    summary = summarise(RunStore(tmp_path / "runs").list_runs())
    assert len(summary) == 1 and summary["n_seeds"].item() == 3
    other = make_duke(tmp_path / "other", n_train=5)
    train(RunConfig(**{**fields, "data": str(other)}), tmp_path / "runs", progress=False,
          log=lambda *_: None)
    assert len(summarise(RunStore(tmp_path / "runs").list_runs())) == 2


@pytest.mark.slow
def test_report_of_one_profile_lists_its_runs_and_those_not_started(study, tmp_path, capsys):
    root, configs, _ = study
    profile = tmp_path / "part.toml"
    profile.write_text(PROFILE.split("[[grid]]")[0] + "[[grid]]" + PROFILE.split("[[grid]]")[1]
                       .replace("seed = [0, 1]", "seed = [0, 1, 7]"))
    rc, _, err = main(capsys, "report", str(root), "--out", str(tmp_path / "out"),
                      "--profile", str(profile), "--data", "synthetic")
    assert rc == 0, err
    summary = pd.read_csv(tmp_path / "out" / "summary.csv")
    reported = set(" ".join(summary["run_ids"]).split())
    dp = [c.run_id() for c in configs if c.method == "dp_sgd"]
    assert reported == {configs[0].run_id(), *dp}          # pretraining + the 2 trained seeds
    report = (tmp_path / "out" / "report.md").read_text()
    assert "not started" in report and "unet-failed-run" not in report
    rc, _, err = main(capsys, "report", str(root), "--data", "synthetic")
    assert rc == 2 and "--profile" in err
    # --seeds replaces the profile's seed lists, as the sweep's --seeds does
    rc, _, err = main(capsys, "report", str(root), "--out", str(tmp_path / "seed1"),
                      "--profile", str(profile), "--data", "synthetic", "--seeds", "1")
    assert rc == 0, err
    seed1 = pd.read_csv(tmp_path / "seed1" / "summary.csv")
    dp_seed1 = {c.run_id() for c in configs if c.method == "dp_sgd" and c.seed == 1}
    assert dp_seed1 and set(" ".join(seed1["run_ids"]).split()) == {configs[0].run_id(), *dp_seed1}


def test_readable_table_shows_the_settings_that_differ_and_only_those():
    from dpstudy.report import TABLE_KEYS, readable_table
    common = {k: "x" for k in TABLE_KEYS} | {
        "model": "unet", "method": "auto_clip", "depth": 4, "noise_multiplier": 2.0,
        "target_epsilon": 3.0, "max_grad_norm": 1.0, "init_from": "pre", "pretraining": False,
        "n_seeds": 3, "epsilon": 2.99, "val_dice_fg_mean": 0.7, "val_dice_fg_std": 0.01,
        "val_dice_all_mean": 0.72, "val_dice_all_std": 0.01, "mia_auc": np.nan,
        "mia_auc_std": np.nan, "mia_reference_auc": np.nan}
    summary = pd.DataFrame([{**common, "config": 1, "base_width": 8, "lr": np.nan},
                            {**common, "config": 2, "base_width": 16, "lr": 0.02}])
    summary["lr"] = summary["lr"].astype(object)   # as read back from summary.csv
    table = readable_table(summary)
    assert list(table["base_width"]) == [8, 16] and list(table["lr"]) == ["", "0.02"]
    assert "depth" not in table and "target_epsilon" not in table
    assert list(table["Dice (fg)"]) == ["0.700 ± 0.010"] * 2


def _lever_summary():
    """A lever study's summary: two settings of one method at one ε, a non-private run."""
    from dpstudy.report import TABLE_KEYS
    common = {k: "x" for k in TABLE_KEYS} | {
        "model": "unet", "method": "auto_clip", "depth": 4, "noise_multiplier": 2.7,
        "target_epsilon": 3.0, "image_size": (128, 128), "pretraining": False,
        "val_dice_fg_mean": 0.76, "val_dice_fg_std": 0.006, "n_seeds": 3}
    return pd.DataFrame([
        {**common, "config": 2, "depth": 4},
        {**common, "config": 3, "depth": 5, "image_size": (256, 128), "n_seeds": 1,
         "val_dice_fg_mean": 0.75, "val_dice_fg_std": np.nan},
        {**common, "config": 4, "method": "non_dp", "noise_multiplier": np.nan,
         "target_epsilon": np.nan, "val_dice_fg_mean": 0.82}])


def test_setting_labels_name_the_budget_and_the_settings_that_differ():
    from dpstudy.report import setting_labels
    assert setting_labels(_lever_summary()) == [
        "2. Automatic Clipping, ε 3, depth 4, image size 128×128",
        "3. Automatic Clipping, ε 3, depth 5, image size 256×128",
        "4. non-private, depth 4, image size 128×128"]


def test_settings_chart_only_for_settings_that_share_a_budget():
    from dpstudy.report import _levers_at_one_budget
    levers = _lever_summary()
    assert _levers_at_one_budget(levers)
    frontier = levers.assign(target_epsilon=[1.0, 3.0, np.nan])   # one config per ε
    assert not _levers_at_one_budget(frontier)
    grid = pd.concat([levers] * 10, ignore_index=True)              # 30 configurations
    assert not _levers_at_one_budget(grid)
