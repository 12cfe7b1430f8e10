"""Killed, cancelled and restarted trainings: the store stays readable, nothing is lost,
and a restarted DP run is a new training whose ε counts its own steps only."""

import json
import random
import re
import signal
import time

import pandas as pd
import pytest
from opacus.accountants import RDPAccountant

from _runs import (TINY, assert_store_readable, cli, history_rows, make_duke, quiet, snapshot,
                   start_cli, tiny_args, wait_for, write_run)
from _runs import one_thread  # noqa: F401 — a fixture, used by pytestmark
from dpstudy.config import RunConfig
from dpstudy.errors import ConfigError
from dpstudy.privacy.accounting import epsilon
from dpstudy.store import RunLock, RunStore
from dpstudy.train import train

FILES = {"config.json", "history.csv", "model.pt", "predictions.h5", ".lock"}
SIGNALS = (signal.SIGINT, signal.SIGTERM)
pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.slow]   # real trainings


@pytest.fixture
def dp_run(tmp_path) -> tuple[RunConfig, list[str]]:
    """A 3-epoch DP run on a small Duke folder: its config and its ``dpstudy`` arguments."""
    data = make_duke(tmp_path / "duke")
    cfg = RunConfig(**{**TINY, "data": str(data), "epochs": 3}, method="dp_sgd",
                    noise_multiplier=1.0)
    args = [*tiny_args(data), "--epochs", "3"]
    return cfg, args


def _running_as(run_dir, pid: int) -> bool:
    try:
        meta = json.loads((run_dir / "config.json").read_text())
    except FileNotFoundError:
        return False
    return meta["status"] == "running" and meta["pid"] == pid


def _assert_accounted_from_scratch(meta: dict, hist: pd.DataFrame) -> None:
    """ε of every epoch is the accountant's over this run's own steps, from step 0."""
    q, sigma, delta = meta["sample_rate"], meta["noise_multiplier"], meta["config"]["delta"]
    per_epoch = round(1 / q)
    assert list(hist["steps"]) == [per_epoch * e for e in hist["epoch"]]
    for steps, eps in zip(hist["steps"], hist["epsilon"]):
        assert eps == pytest.approx(epsilon(q, sigma, int(steps), delta), rel=1e-9)
    acc = RDPAccountant()
    for _ in range(meta["steps"]):
        acc.step(noise_multiplier=sigma, sample_rate=q)
    assert meta["epsilon"] == pytest.approx(acc.get_epsilon(delta), rel=1e-9)


def test_sigkill_at_random_moments_then_sweep_finishes_the_run(tmp_path, dp_run):
    cfg, args = dp_run
    root = tmp_path / "runs"
    others = [write_run(root, "other-completed", checkpoint=True),
              write_run(root, "other-failed", status="failed", epochs=1)]
    before = {d.name: snapshot(d) for d in others}
    store, run_dir = RunStore(root), root / cfg.run_id()
    rng = random.Random(1729)
    outcomes, epoch = [], None
    for _ in range(3):
        proc = start_cli("train", *args, "--method", "dp_sgd", "--noise-multiplier", "1.0",
                         "--quiet", "--force", "--runs-dir", str(root))   # even if it completed
        # A random moment of a random epoch, relative to observed progress, so that a
        # faster or slower machine moves it along: right after history row n (n = 0:
        # training has started) plus a random part of one epoch, timed from row 1 to
        # row 2 in the first attempt (the first epoch also pays one-off start-up costs).
        rows = 2 if epoch is None else rng.randrange(3)
        try:
            assert wait_for(lambda: _running_as(run_dir, proc.pid)
                            and history_rows(run_dir) >= min(rows, 1), timeout=120)
            first_row = time.monotonic()
            assert wait_for(lambda: _running_as(run_dir, proc.pid)
                            and history_rows(run_dir) >= rows, timeout=120)
            epoch = epoch or time.monotonic() - first_row
            time.sleep(rng.uniform(0.0, 0.9) * epoch)
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.communicate()
        last_kill = time.time()
        runs = assert_store_readable(root).set_index("run_id")
        meta = store.read_meta(cfg.run_id())
        outcomes.append(meta["status"])
        assert meta["status"] in ("interrupted", "completed")
        assert runs.loc[cfg.run_id(), "status"] == meta["status"]
        rows = history_rows(run_dir)
        assert meta["epochs_done"] in (rows, rows - 1)   # killed between the two writes
        leftovers = {p.name for p in run_dir.iterdir()} - FILES
        assert all(n.startswith(".") and n.endswith(".tmp") for n in leftovers), leftovers
        if "completed" not in outcomes and rows < cfg.epochs:   # none before the last epoch
            assert not (run_dir / "model.pt").exists()    # (a kill while the run saves its
                                                          # results may leave one)
        assert {d.name: snapshot(d) for d in others} == before
    assert outcomes.count("interrupted") >= 2, outcomes

    r = cli("sweep", *args, "--methods", "dp_sgd", "--noise-multipliers", "1.0",
            "--runs-dir", str(root), timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split() == ["completed", cfg.run_id()]
    meta = store.read_meta(cfg.run_id())
    hist = store.read_history(cfg.run_id())
    assert meta["status"] == "completed" and meta["created"] > last_kill
    assert list(hist["epoch"]) == [1, 2, 3] and meta["epochs_done"] == 3
    _assert_accounted_from_scratch(meta, hist)
    assert {d.name: snapshot(d) for d in others} == before
    assert set(store.list_runs()["status"]) == {"completed", "failed"}

    # re-running after crashes *is* a fresh training: the same as one never interrupted
    clean = train(cfg, tmp_path / "clean", progress=False, log=quiet)
    reference = pd.read_csv(clean / "history.csv")
    for col in ("train_loss", "val_loss", "val_dice_fg_mean", "epsilon", "steps"):
        assert list(hist[col]) == pytest.approx(list(reference[col]), rel=1e-4), col


def test_sigint_and_sigterm_cancel_the_run_keeping_the_epochs_done(tmp_path, dp_run):
    cfg, args = dp_run
    root = tmp_path / "runs"
    store = RunStore(root)
    runs = {sig: (cfg.replace(seed=seed), start_cli(
        "train", *args, "--method", "dp_sgd", "--noise-multiplier", "1.0", "--seed", str(seed),
        "--quiet", "--runs-dir", str(root))) for seed, sig in enumerate(SIGNALS)}
    waiting = dict(runs)                       # both at once; each signalled right after the
    deadline = time.monotonic() + 120          # write of its first epoch, mid-bookkeeping
    while waiting and time.monotonic() < deadline:
        for sig, (run_cfg, proc) in list(waiting.items()):
            if history_rows(root / run_cfg.run_id()) >= 1:
                proc.send_signal(sig)
                del waiting[sig]
        time.sleep(0.005)
    for sig, (run_cfg, proc) in runs.items():
        if sig in waiting:
            proc.kill()
        _, err = proc.communicate(timeout=120)
        assert sig not in waiting and proc.returncode == 130, err
        assert f"dpstudy: cancelled ({sig.name}); epochs done so far are saved" in err
        assert "Traceback" not in err
        meta = store.read_meta(run_cfg.run_id())
        done = meta["epochs_done"]
        assert meta["status"] == "cancelled" and 1 <= done <= 3
        assert meta["error"] == f"cancelled by {sig.name} after {done} epoch(s)"
        hist = store.read_history(run_cfg.run_id())
        assert list(hist["epoch"]) == list(range(1, done + 1))
        _assert_accounted_from_scratch(meta, hist)
        RunLock(root / run_cfg.run_id()).acquire().release()   # the lock went with the process


def test_no_run_continues_weights_whose_privacy_cost_it_does_not_count(tmp_path):
    """init_from is the one path that starts from other weights: only public ones qualify."""
    private = RunConfig(**TINY, method="dp_sgd", noise_multiplier=1.0)
    for run_id, fields, message in [
        ("on-duke", dict(data={"kind": "duke", "spec": "/data/DukeData"}),
         "init_from=on-duke: run on-duke was trained on duke data; a private run may only "
         "start from weights trained on public (synthetic) data alone"),
        # a phantom run whose own weights started from the Duke run: checked transitively
        ("laundered", dict(config={**RunConfig(**TINY, init_from="on-duke").to_dict()}),
         "init_from=laundered: run on-duke (an ancestor of laundered) was trained on duke"),
        ("interrupted", dict(status="running"),
         "init_from=interrupted: that run is interrupted; only a completed run's weights"),
        ("cancelled", dict(status="cancelled"), "that run is cancelled"),
    ]:
        write_run(tmp_path, run_id, checkpoint=True, **fields)
        with pytest.raises(ConfigError, match=re.escape(message)):
            train(private.replace(init_from=run_id), tmp_path, progress=False, log=quiet)
    assert sorted(RunStore(tmp_path).run_ids()) == ["cancelled", "interrupted", "laundered",
                                                    "on-duke"]
    # a non-private run claims no ε: it may start from any completed run
    assert train(RunConfig(**TINY, init_from="on-duke"), tmp_path, progress=False, log=quiet)
