"""Several processes on one run store: one trainer per run, readers never fail."""

import json
import shutil
import signal
import subprocess
import sys
import time

import pytest

import dpstudy.train
from _runs import TINY, make_duke, quiet, snapshot, start_cli, tiny_args
from _runs import one_thread  # noqa: F401 — a fixture, used below
from dpstudy.config import RunConfig
from dpstudy.errors import StoreError
from dpstudy.store import RunLock, RunStore
from dpstudy.sweep import _train_one, expand_grid

HOLDER = """
import sys, time
from dpstudy.store import RunLock
RunLock(sys.argv[1]).acquire()
print("locked", flush=True)
time.sleep(120)
"""


def test_run_lock_refuses_a_second_holder_until_the_first_dies(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"config": {}, "status": "running"}))
    store = RunStore(tmp_path.parent)
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(StoreError, match=f"run {tmp_path.name} is being trained by another "
                                             f"process"):
            RunLock(tmp_path).acquire()
        assert store.read_meta(tmp_path.name)["status"] == "running"   # a reader sees it live
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # the kernel released the lock of the killed holder
    assert store.read_meta(tmp_path.name)["status"] == "interrupted"
    lock = RunLock(tmp_path).acquire()
    with pytest.raises(StoreError, match="being trained by another process"):
        RunLock(tmp_path).acquire()          # even within one process: one holder at a time
    lock.release()
    RunLock(tmp_path).acquire().release()


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
def test_a_run_completed_while_a_sweep_was_deciding_is_not_trained_again(tmp_path,
                                                                         monkeypatch):
    """The sweep checks 'completed' before it takes the lock: the check must be redone."""
    cfg = RunConfig(**TINY)
    done = dpstudy.train.train(cfg, tmp_path / "elsewhere", progress=False, log=quiet)
    store = tmp_path / "store"
    load_data = dpstudy.train.load_data

    def other_sweep_finishes_meanwhile(*args, **kwargs):
        shutil.copytree(done, store / cfg.run_id())
        return load_data(*args, **kwargs)

    monkeypatch.setattr(dpstudy.train, "load_data", other_sweep_finishes_meanwhile)
    result = _train_one(cfg.to_dict(), str(store), 1)
    assert result["status"] == "skipped (completed)"
    assert snapshot(store / cfg.run_id()) == snapshot(done)


def _sweep_results(stdout: str) -> dict[str, str]:
    """{run id: status} from the lines ``dpstudy sweep`` prints."""
    return {line[23:].split()[0]: line[:22].strip() for line in stdout.splitlines()}


@pytest.mark.slow
def test_two_sweeps_over_overlapping_grids_train_each_run_once(tmp_path):
    root, data = tmp_path / "runs", make_duke(tmp_path / "duke")
    common = ["sweep", *tiny_args(data), "--epochs", "2", "--noise-multipliers", "1.0", "2.0",
              "--runs-dir", str(root)]
    sweeps = [start_cli(*common, "--methods", "dp_sgd"),
              start_cli(*common, "--methods", "dp_sgd", "non_dp")]
    store, reads, statuses = RunStore(root), 0, set()
    deadline = time.monotonic() + 400
    try:
        while any(p.poll() is None for p in sweeps) and time.monotonic() < deadline:
            runs = store.list_runs()            # a reader while both write: never an error
            reads += 1
            if len(runs):
                assert "broken" not in set(runs["status"]), runs["error"].tolist()
                statuses |= set(runs["status"])
            time.sleep(0.01)
    finally:
        for p in sweeps:
            if p.poll() is None:
                p.kill()
    outputs = [p.communicate() for p in sweeps]
    for p, (out, err) in zip(sweeps, outputs):
        assert p.returncode == 0, err[-2000:]
    assert reads > 50 and "running" in statuses

    expected = {c.run_id() for c in expand_grid(
        {**TINY, "data": str(data), "epochs": 2}, {"method": ["dp_sgd", "non_dp"],
                                "noise_multiplier": [1.0, 2.0]})}
    assert set(store.run_ids()) == expected and len(expected) == 3      # the union, complete
    results = [_sweep_results(out) for out, _ in outputs]
    for run_id in expected:
        meta = store.read_meta(run_id)
        assert meta["status"] == "completed"
        assert list(store.read_history(run_id)["epoch"]) == [1, 2]      # nothing interleaved
        trainers = [i for i, r in enumerate(results) if r.get(run_id) == "completed"]
        assert len(trainers) == 1, (run_id, results)                    # trained exactly once
        assert meta["pid"] == sweeps[trainers[0]].pid
        for r in results:
            assert r.get(run_id, "skipped (completed)") in (
                "completed", "skipped (completed)", "skipped (locked)")
    assert not [p for p in root.rglob("*") if p.name.endswith(".tmp")]
