"""Helpers of the reliability tests: tiny runs, the CLI as a subprocess, store checks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from dpstudy.config import RunConfig
from dpstudy.models import build_model
from dpstudy.store import RunStore

#: the smallest training that exercises everything
TINY = dict(data="synthetic", limit=4, image_size=(32, 32), base_width=8, depth=2, epochs=1,
            batch_size=2)
TINY_ARGS = ["--data", "synthetic", "--limit", "4", "--image-size", "32", "32",
             "--base-width", "8", "--depth", "2", "--batch-size", "2"]


def tiny_args(data: Path) -> list[str]:
    """TINY_ARGS on a small Duke folder (:func:`make_duke`): 40×36 scans evaluate fast."""
    return ["--data", str(data), *TINY_ARGS[2:]]


@pytest.fixture
def one_thread():
    """In-process training on one thread: on 2 shared cores, 2 threads run 2-3× slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def quiet(*_):
    """A ``log`` that prints nothing."""


def cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """``python -m dpstudy ARGS`` as a user runs it."""
    return subprocess.run([sys.executable, "-m", "dpstudy", *args], capture_output=True,
                          text=True, timeout=timeout, env=_env())


def start_cli(*args: str) -> subprocess.Popen:
    """``python -m dpstudy ARGS`` in the background, in its own process group."""
    return subprocess.Popen([sys.executable, "-m", "dpstudy", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env=_env())


def main(capsys, *args: str) -> tuple[int, str, str]:
    """The CLI's ``main`` in this process (no start-up cost): exit status, stdout, stderr."""
    from dpstudy.cli import main as cli_main
    capsys.readouterr()
    rc = cli_main(list(args))
    out, err = capsys.readouterr()
    return rc, out, err


def assert_one_line_error(rc: int, stderr: str, *fragments: str) -> str:
    """Exit 2, the error as the last stderr line, no traceback; returns that line."""
    assert rc == 2, (rc, stderr)
    assert "Traceback" not in stderr, stderr
    lines = stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("dpstudy: error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], stderr
    for fragment in fragments:
        assert fragment in errors[0], (fragment, errors[0])
    return errors[0]


def snapshot(run_dir: Path) -> dict[str, bytes]:
    """Every file of a run directory but the lock, by name: for byte-identity checks."""
    return {p.name: p.read_bytes() for p in sorted(Path(run_dir).iterdir())
            if p.is_file() and p.name != ".lock"}


def write_run(root: Path, run_id: str, status: str = "completed", epochs: int = 2,
              checkpoint: bool = False, **meta) -> Path:
    """A run directory as the trainer leaves it, without training (fast store tests)."""
    cfg = RunConfig(**{**TINY, "epochs": epochs})
    run_dir = Path(root) / run_id
    run_dir.mkdir(parents=True, exist_ok=True)
    doc = {"config": cfg.to_dict(), "run_id": run_id, "status": status, "error": None,
           "pid": 1, "created": 1.0, "updated": 2.0, "epochs_done": epochs, "private": False,
           "data": {"kind": "synthetic", "spec": "synthetic", "fingerprint": "0" * 16},
           "normalisation": {"mean": 100.0, "std": 50.0},
           **meta}
    (run_dir / "config.json").write_text(json.dumps(doc))
    pd.DataFrame({"epoch": range(1, epochs + 1), "train_loss": np.linspace(1, 0.5, epochs),
                  "val_dice_fg_mean": np.linspace(0.1, 0.3, epochs)}).to_csv(
        run_dir / "history.csv", index=False)
    if checkpoint:
        torch.save(build_model(cfg.model, cfg.base_width, cfg.depth).state_dict(),
                   run_dir / "model.pt")
    return run_dir


def make_duke(root: Path, n_train: int = 4, n_val: int = 2, shape=(40, 36),
              scans: int = 1) -> Path:
    """A valid prepared-Duke folder of small B-scans (labels are horizontal bands 0..9):
    ``n_train``/``n_val`` subjects of ``scans`` B-scans each."""
    rng = np.random.default_rng(0)
    bands = (np.arange(shape[0]) * 10 // shape[0]).astype(np.uint8)
    for split, n in (("train", n_train), ("val", n_val)):
        for kind in ("images", "masks"):
            (Path(root) / split / kind).mkdir(parents=True, exist_ok=True)
        for i, k in ((i, k) for i in range(n) for k in range(scans)):
            name = f"Subject_{i + 1:02d}_{k:02d}.npy"
            np.save(Path(root) / split / "images" / name,
                    rng.integers(0, 256, shape, dtype=np.uint8))
            np.save(Path(root) / split / "masks" / name,
                    np.repeat(bands[:, None], shape[1], axis=1))
    return Path(root)


def assert_store_readable(root: Path) -> pd.DataFrame:
    """Every config.json is JSON, every history.csv parses, ``list_runs`` lists no broken run."""
    for run_dir in Path(root).iterdir():
        if (run_dir / "config.json").exists():
            assert isinstance(json.loads((run_dir / "config.json").read_text()), dict)
        if (run_dir / "history.csv").exists():
            hist = pd.read_csv(run_dir / "history.csv")
            assert list(hist["epoch"]) == list(range(1, len(hist) + 1))
    runs = RunStore(root).list_runs()
    assert "broken" not in set(runs.get("status", [])), runs.get("error")
    return runs


def wait_for(predicate, timeout: float, interval: float = 0.02):
    """Poll until ``predicate()`` is truthy; its value, or None on timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    return None


def history_rows(run_dir: Path) -> int:
    """Epochs recorded so far (0 while there is no history)."""
    try:
        return len(pd.read_csv(Path(run_dir) / "history.csv"))
    except (FileNotFoundError, pd.errors.EmptyDataError):
        return 0
