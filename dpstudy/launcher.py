"""Start and cancel training processes on behalf of the app.

A launch is ``python -m dpstudy train|sweep …`` started from an argument list (never a
shell, so no input is ever parsed as shell syntax) in a session of its own: closing
the browser or restarting the app does not stop it, and SIGTERM to its process group
reaches every process it started. Each launch leaves ``<runs>/.launches/<id>.json``
(what was started, pid) and ``<id>.log`` (its output), so any later app session can
list it. Process identity is checked by start time (Linux ``/proc``) before a signal
is sent, so a recycled pid is never signalled.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .cli import COMMON
from .config import RunConfig
from .errors import StoreError
from .store import RunStore, atomic_write_json

LAUNCH_DIR = ".launches"
LAUNCH_ID_RE = re.compile(r"[0-9]{8}-[0-9]{6}-[0-9]+")
#: Grid axes of ``dpstudy sweep`` (option ``--models`` etc.).
GRID_AXES = ("models", "methods", "noise_multipliers", "target_epsilons",
             "max_grad_norms", "seeds")
#: The launches this process started. Keeping their ``Popen`` objects lets polling reap
#: them with their exit status (dropped ones would be reaped silently by ``subprocess``).
_CHILDREN: dict[int, subprocess.Popen] = {}


def _options(cfg: RunConfig, skip: tuple[str, ...] = ()) -> list[str]:
    """The CLI options that reproduce ``cfg``'s shared fields, every value explicit.

    ``--flag=value`` keeps a value that starts with ``-`` from being read as an option.
    """
    args = [f"{flag}={getattr(cfg, field)}" for field, (flag, _) in COMMON.items()
            if field not in skip and getattr(cfg, field) is not None]
    if cfg.augment:
        args.append("--augment")
    return [*args, "--image-size", *map(str, cfg.image_size), f"--data={cfg.data}"]


def train_argv(cfg: RunConfig) -> list[str]:
    """``dpstudy train`` arguments for one run."""
    noise = ([f"--noise-multiplier={cfg.noise_multiplier}"] if cfg.noise_multiplier is not None
             else [f"--target-epsilon={cfg.target_epsilon}"] if cfg.target_epsilon is not None
             else [])
    return ["train", f"--model={cfg.model}", f"--method={cfg.method}", *noise,
            f"--seed={cfg.seed}", "--quiet", *_options(cfg)]


def sweep_argv(base: RunConfig, grid: dict[str, list], jobs: int = 1) -> list[str]:
    """``dpstudy sweep`` arguments: ``base`` for the shared options, ``grid`` (keys from
    :data:`GRID_AXES`) for the axes."""
    unknown = set(grid) - set(GRID_AXES)
    if unknown:
        raise ValueError(f"unknown grid axes {sorted(unknown)}; use {GRID_AXES}")
    axes = [arg for axis, values in grid.items() if values
            for arg in (f"--{axis.replace('_', '-')}", *map(str, values))]
    skip = ("max_grad_norm",) if grid.get("max_grad_norms") else ()
    return ["sweep", *axes, f"--jobs={jobs}", *_options(base, skip)]


def launches_dir(root: Path | str) -> Path:
    return Path(root) / LAUNCH_DIR


def _start_time(pid: int) -> int | None:
    """Kernel start time of ``pid`` (clock ticks), None if gone or a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()
    return None if fields[0] == "Z" else int(fields[19])


def launch(args: list[str], root: Path | str | None = None) -> dict:
    """Start ``python -m dpstudy <args>`` writing into the store at ``root``."""
    store = RunStore(root)
    folder = launches_dir(store.root.resolve())
    folder.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    argv = [sys.executable, "-m", "dpstudy", *args, f"--runs-dir={store.root.resolve()}"]
    fd, log_path = tempfile.mkstemp(dir=folder, prefix=".pending-", suffix=".log")
    with os.fdopen(fd, "wb") as log:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
    _CHILDREN[proc.pid] = proc
    launch_id = f"{stamp}-{proc.pid}"
    os.replace(log_path, folder / f"{launch_id}.log")  # the child keeps its open file
    record = {"id": launch_id, "kind": args[0], "argv": argv, "pid": proc.pid,
              "start_time": _start_time(proc.pid), "started": time.time(),
              "returncode": None}
    atomic_write_json(folder / f"{launch_id}.json", record)
    return record


def _reap(record: dict, path: Path) -> None:
    """Collect a finished child of this process (no zombie) and keep its exit status."""
    proc = _CHILDREN.get(record["pid"])
    if proc is not None and proc.poll() is not None:
        record["returncode"] = proc.returncode
        atomic_write_json(path, record)
        _CHILDREN.pop(record["pid"], None)


def is_alive(record: dict) -> bool:
    return (record.get("returncode") is None and record.get("start_time") is not None
            and _start_time(record["pid"]) == record["start_time"])


def list_launches(root: Path | str | None = None) -> list[dict]:
    """Every launch of the store, newest first, with ``alive`` and ``log`` (its path)."""
    folder = launches_dir(RunStore(root).root)
    records = []
    for path in sorted(folder.glob("*.json"), reverse=True):
        try:
            record = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue  # a half-deleted launch record is not worth an error
        _reap(record, path)
        records.append({**record, "alive": is_alive(record),
                        "log": str(path.with_suffix(".log"))})
    return records


def log_tail(record: dict, lines: int = 15) -> str:
    try:
        text = Path(record["log"]).read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def cancel_launch(root: Path | str | None, launch_id: str) -> None:
    """SIGTERM to the launch's whole process group (a sweep's workers included)."""
    if not LAUNCH_ID_RE.fullmatch(launch_id):
        raise StoreError(f"invalid launch id {launch_id!r}")
    path = launches_dir(RunStore(root).root) / f"{launch_id}.json"
    try:
        record = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise StoreError(f"{path}: cannot read launch ({exc})") from None
    if not is_alive(record):
        raise StoreError(f"launch {launch_id} is not running")
    os.killpg(record["pid"], signal.SIGTERM)


def cancel_run(store: RunStore, run_id: str) -> None:
    """SIGTERM to the process training ``run_id``; the trainer records ``cancelled``.

    The store says ``running`` only while the run's lock is held, so the pid it
    records is live. A run that leads its own process group (every app launch) is
    stopped with its group; a sweep worker alone, so the sweep goes on.
    """
    meta = store.read_meta(run_id)
    if meta.get("status") != "running" or not meta.get("pid"):
        raise StoreError(f"run {run_id} is not running (status {meta.get('status')})")
    pid = int(meta["pid"])
    try:
        if os.getpgid(pid) == pid:
            os.killpg(pid, signal.SIGTERM)
        else:
            os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        raise StoreError(f"run {run_id}: process {pid} has already ended") from None
