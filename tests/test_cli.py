"""The command line, run as a user runs it: a real subprocess."""

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

TINY = ["--data", "synthetic", "--limit", "4", "--image-size", "32", "32", "--base-width", "8",
        "--depth", "2", "--epochs", "1", "--batch-size", "2", "--quiet"]


def dpstudy(*args, cwd=None, env=None):
    return subprocess.run([sys.executable, "-m", "dpstudy", *args], capture_output=True,
                          text=True, cwd=cwd, env=env, timeout=300)


@pytest.mark.slow   # trains in subprocesses: 10-20 s on 2 shared cores
def test_train_prints_the_run_directory_last_and_says_which_data(tmp_path):
    r = dpstudy("train", "--method", "auto_clip", "--noise-multiplier", "1.5", *TINY,
                "--runs-dir", str(tmp_path))
    assert r.returncode == 0, r.stderr
    run_dir = Path(r.stdout.strip().splitlines()[-1])
    assert run_dir.parent == tmp_path and run_dir.name.startswith("unet-auto_clip-sigma1.5-")
    assert "synthetic OCT phantom" in r.stderr
    assert json.loads((run_dir / "config.json").read_text())["status"] == "completed"

    runs = dpstudy("runs", "--runs-dir", str(tmp_path), "--json")
    rows = json.loads(runs.stdout)
    assert [row["run_id"] for row in rows] == [run_dir.name]

    ev = dpstudy("evaluate", run_dir.name, "--split", "val", "--json", "--runs-dir",
                 str(tmp_path))
    assert ev.returncode == 0, ev.stderr
    metrics = json.loads(ev.stdout)
    assert metrics["split"] == "val" and 0 <= metrics["dice_fg_mean"] <= 1
    # the images the run was evaluated on (its --limit 4), so the app's Dice agrees
    final = pd.read_csv(run_dir / "history.csv").iloc[-1]
    assert metrics["n_images"] == 4 and metrics["limit"] == 4
    assert metrics["dice_fg_mean"] == pytest.approx(final["val_dice_fg_mean"], abs=1e-9)
    assert "—" in ev.stdout and "\\u2014" not in ev.stdout  # JSON keeps non-ASCII as is
    assert "—" in runs.stdout and "\\u2014" not in runs.stdout


def test_sweep_dry_run_lists_the_runs_and_says_how_long_they_would_take(tmp_path):
    r = dpstudy("sweep", "--methods", "non_dp", "dp_sgd", "--noise-multipliers", "1.0",
                "--dry-run", *TINY[:-1], "--runs-dir", str(tmp_path))
    assert r.returncode == 0, r.stderr
    ids = r.stdout.split()
    assert len(ids) == 2 and ids[0].startswith("unet-non_dp-") and not any(tmp_path.iterdir())
    assert "2 of 2 runs to train: about" in r.stderr and "with --jobs 1" in r.stderr


@pytest.mark.slow   # trains in subprocesses: 10-20 s on 2 shared cores
def test_evaluate_takes_the_run_directory_train_printed(tmp_path):
    """From another directory, without --runs-dir: the path says which store."""
    r = dpstudy("train", *TINY, "--runs-dir", str(tmp_path / "store"))
    run_dir = r.stdout.strip().splitlines()[-1]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    ev = dpstudy("evaluate", run_dir, "--split", "test", cwd=elsewhere)
    assert ev.returncode == 0, ev.stderr
    name = Path(run_dir).name
    assert ev.stdout.splitlines()[0] == (
        f"Scored 4 images of run {name}: the 'test' split of synthetic OCT phantom (seed 0, standard), "
        f"the first 4 images (the run's --limit).")
    ev = dpstudy("evaluate", run_dir, "--all-images", "--json", cwd=elsewhere)
    assert json.loads(ev.stdout)["n_images"] == 22 and json.loads(ev.stdout)["limit"] is None
    ev = dpstudy("evaluate", run_dir, "--limit", "0", cwd=elsewhere)
    assert ev.returncode == 2 and "limit=0 is invalid" in ev.stderr


def test_errors_are_one_line_without_traceback(tmp_path):
    r = dpstudy("train", "--method", "dp_sgd", *TINY, "--runs-dir", str(tmp_path))
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "Traceback" not in r.stderr
    assert "noise_multiplier" in r.stderr and "target_epsilon" in r.stderr

    r = dpstudy("train", *TINY, "--image-size", "30", "30", "--runs-dir", str(tmp_path))
    assert r.returncode == 2 and "not divisible by 4" in r.stderr

    r = dpstudy("train", *TINY, "--data", str(tmp_path / "nope"), "--runs-dir", str(tmp_path))
    assert r.returncode == 2 and str(tmp_path / "nope") in r.stderr

    r = dpstudy("--debug", "train", "--method", "dp_sgd", *TINY, "--runs-dir", str(tmp_path))
    assert r.returncode != 0 and "Traceback" in r.stderr


@pytest.mark.slow   # trains in subprocesses: 10-20 s on 2 shared cores
def test_data_location_falls_back_to_the_environment_then_the_phantom(tmp_path):
    import os
    env = {**os.environ, "DPSTUDY_DATA": str(tmp_path / "missing")}
    r = dpstudy("train", *TINY[2:], "--runs-dir", str(tmp_path / "runs"), env=env)
    assert r.returncode == 2 and str(tmp_path / "missing") in r.stderr
    env.pop("DPSTUDY_DATA")
    r = dpstudy("train", *TINY[2:], "--runs-dir", str(tmp_path / "runs"), cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stderr
    assert "synthetic OCT phantom" in r.stderr


@pytest.mark.slow   # trains in subprocesses: 10-20 s on 2 shared cores
def test_a_completed_run_is_not_retrained_without_force(tmp_path):
    args = ("train", *TINY, "--runs-dir", str(tmp_path))
    first = dpstudy(*args)
    run_dir = Path(first.stdout.strip().splitlines()[-1])
    before = (run_dir / "model.pt").read_bytes()
    again = dpstudy(*args)
    assert again.returncode == 2 and "already completed" in again.stderr and "--force" in again.stderr
    assert (run_dir / "model.pt").read_bytes() == before
    forced = dpstudy(*args, "--force")
    assert forced.returncode == 0, forced.stderr
    assert json.loads((run_dir / "config.json").read_text())["status"] == "completed"
