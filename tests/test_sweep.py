"""Sweeps: grid expansion, resuming after an interruption, a Dask cluster."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from dpstudy.store import RunStore
from dpstudy.sweep import PROFILES_DIR, expand_grid, load_profile, run_sweep

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


#: (grid runs, pretraining runs) of every shipped profile, as its header comment says.
DOCUMENTED_RUNS = {"quick": (26, 2), "matched": (39, 1), "paper": (162, 2), "audit": (30, 1),
                   "best": (10, 1), "landscape": (153, 1), "models": (60, 2), "levers": (9, 1), "levers_pretrain": (3, 1),
                   "width": (15, 2), "levers_w16": (19, 2),
                   "levers_w16_pretrain": (3, 1), "levers_optimizer": (8, 1),
                   "levers_resolution": (7, 2), "levers_depth": (15, 4),
                   "levers_fluid_pretrain": (3, 1), "levers_adapters": (28, 1)}


def test_every_shipped_profile_expands_to_the_runs_it_documents():
    assert sorted(p.stem for p in PROFILES_DIR.glob("*.toml")) == sorted(DOCUMENTED_RUNS)
    ids = {}
    for name, (runs, pretraining) in DOCUMENTED_RUNS.items():
        configs, _ = load_profile(name)
        header = (PROFILES_DIR / f"{name}.toml").read_text().split("\n[base]")[0]
        assert re.search(rf"\b{runs} ([\w-]+ )?runs\b", header), (name, runs)
        pre, grid = configs[:pretraining], configs[pretraining:]
        assert len(grid) == runs, name
        # pretraining first: non-private, on public phantom data, the start of every
        # pretrained run, and of the same architecture
        assert all(c.method == "non_dp" and c.data.startswith("synthetic")
                   and c.init_from is None for c in pre), name
        by_id = {c.run_id(): c for c in pre}
        assert {c.init_from for c in grid} - {None} == set(by_id), name
        for c in grid:
            if c.init_from:
                start = by_id[c.init_from]
                assert (start.model, start.base_width, start.depth, start.image_size) == (
                    c.model, c.base_width, c.depth, c.image_size), name
            assert (c.noise_multiplier is None and c.target_epsilon is None) != c.private
        ids[name] = ({c.run_id() for c in pre}, {c.run_id() for c in grid})
    # what the profile comments promise is shared, so trained once: quick's U-Net
    # pretraining and non-private seed-0 run (matched)
    assert ids["matched"][0] < ids["quick"][0]
    assert ids["landscape"][0] == ids["audit"][0] < ids["models"][0]   # one U-Net pretraining at 64²
    assert len(ids["matched"][1] & ids["quick"][1]) == 1
    # width reuses the models profile's U-Net pretraining and its ε = 3 auto_clip seeds
    assert len(ids["width"][0] & ids["models"][0]) == 1
    assert len(ids["width"][1] & ids["models"][1]) == 3
    # levers_w16 reuses the best profile's pretraining and its ε = 3 auto_clip run (seed 0)
    assert len(ids["levers_w16"][0] & ids["best"][0]) == 1
    assert len(ids["levers_w16"][1] & ids["best"][1]) == 1
    # levers_optimizer shares the best profile's pretraining; resolution and depth need
    # their own (another image size, another architecture)
    assert ids["levers_optimizer"][0] == ids["best"][0] == ids["levers_adapters"][0]
    # levers_adapters: the recipe with each of the three methods at ε = 3, and auto_clip
    # at ε = 1 (seed 0)
    assert len(ids["levers_adapters"][1] & ids["best"][1]) == 4
    for name in ("levers_optimizer", "levers_resolution", "levers_depth"):   # the recipe
        assert len(ids[name][1] & ids["best"][1]) == 1, name                # (seed 0)
        assert len(ids[name][0] & ids["best"][0]) == 1, name


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


@pytest.mark.slow
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


@pytest.mark.slow
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
