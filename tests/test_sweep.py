"""Sweeps: grid expansion, resuming after an interruption, a Dask cluster."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from dpstudy.config import RunConfig
from dpstudy.store import RunStore
from dpstudy.sweep import expand_grid, load_profile, run_sweep

BASE = dict(data="synthetic", limit=4, image_size=(32, 32), base_width=8, depth=2, epochs=1,
            batch_size=2)
CLI_BASE = ["--data", "synthetic", "--limit", "4", "--image-size", "32", "32",
            "--base-width", "8", "--depth", "2", "--epochs", "1", "--batch-size", "2"]


def test_grid_gives_one_run_per_privacy_point_and_none_for_non_dp():
    configs = expand_grid(BASE, {"model": ["unet", "nested_unet"],
                                 "method": ["non_dp", "dp_sgd"],
                                 "noise_multiplier": [0.5, 1.0], "target_epsilon": [8.0],
                                 "seed": [0, 1]})
    non_dp = [c for c in configs if c.method == "non_dp"]
    dp = [c for c in configs if c.method == "dp_sgd"]
    assert len(non_dp) == 2 * 2 and all(c.noise_multiplier is None for c in non_dp)
    assert len(dp) == 2 * 3 * 2
    assert {(c.noise_multiplier, c.target_epsilon) for c in dp} == {(0.5, None), (1.0, None),
                                                                    (None, 8.0)}
    assert len({c.run_id() for c in configs}) == len(configs)


def test_shipped_profiles_parse():
    for name in ("quick", "paper"):
        configs, spec = load_profile(name)
        assert configs and all(isinstance(c, RunConfig) for c in configs)


def test_completed_runs_are_skipped(tmp_path):
    grid = {"method": ["non_dp", "dp_sgd"], "noise_multiplier": [1.0]}
    first = run_sweep(expand_grid(BASE, grid), tmp_path, progress=False)
    assert [r["status"] for r in first] == ["completed", "completed"]
    created = {r: RunStore(tmp_path).read_meta(r)["created"] for r in RunStore(tmp_path).run_ids()}
    bigger = expand_grid(BASE, {**grid, "noise_multiplier": [1.0, 2.0]})
    second = run_sweep(bigger, tmp_path, progress=False)
    statuses = {r["run_id"]: r["status"] for r in second}
    assert sorted(statuses.values()) == ["completed", "skipped (completed)", "skipped (completed)"]
    for run_id, t in created.items():
        assert RunStore(tmp_path).read_meta(run_id)["created"] == t


def test_a_killed_sweep_resumes_without_redoing_completed_runs(tmp_path):
    args = [sys.executable, "-m", "dpstudy", "sweep", *CLI_BASE, "--epochs", "3",
            "--methods", "non_dp", "dp_sgd", "--noise-multipliers", "1.0", "2.0",
            "--runs-dir", str(tmp_path)]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    store = RunStore(tmp_path)
    deadline = time.time() + 240
    while time.time() < deadline and not any(store.is_completed(r) for r in store.run_ids()):
        time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = {r: store.read_meta(r)["created"] for r in store.run_ids()
                   if store.is_completed(r)}
    assert done_before, "no run completed before the deadline"
    statuses = {r: store.read_meta(r)["status"] for r in store.run_ids()}
    assert "running" not in statuses.values()      # a killed run reads as interrupted
    result = subprocess.run(args, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert len(store.run_ids()) == 3 and all(store.is_completed(r) for r in store.run_ids())
    for run_id, created in done_before.items():
        assert store.read_meta(run_id)["created"] == created
        assert "skipped (completed)" in next(l for l in result.stdout.splitlines() if run_id in l)


def test_sweep_on_a_dask_cluster_of_two_worker_processes(tmp_path):
    distributed = pytest.importorskip("distributed")
    configs = expand_grid(BASE, {"method": ["dp_sgd"], "noise_multiplier": [1.0, 2.0]})
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  host="127.0.0.1", dashboard_address=None) as cluster:
        results = run_sweep(configs, tmp_path, scheduler=cluster.scheduler_address,
                            progress=False)
    assert sorted(r["status"] for r in results) == ["completed", "completed"]
    pids = {json.loads((tmp_path / c.run_id() / "config.json").read_text())["pid"]
            for c in configs}
    assert os.getpid() not in pids
