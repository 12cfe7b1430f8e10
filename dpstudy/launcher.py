"""Start and cancel the app's processes: trainings, sweeps, audits, evaluations.

A launch is ``python -m dpstudy <command> …`` started from an argument list (never a
shell, so no input is ever parsed as shell syntax) under :mod:`dpstudy.supervise`, in a
session of its own: closing the browser or restarting the app does not stop it, SIGTERM
to its process group reaches every process it started, and its exit status is recorded
whoever is watching. Each launch leaves ``<runs>/.launches/<id>.json`` (what was started,
pid, the runs it trains), ``<id>.log`` (its output) and, once it ends, ``<id>.exit``.
Ids are a sequence number taken atomically, so launches sort in the order they started.
Process identity is checked by start time (Linux ``/proc``) before a signal is sent, so a
recycled pid is never signalled.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from .cli import build_parser
from .config import RunConfig
from .errors import ConfigError, StoreError
from .store import RunStore, atomic_write_json

LAUNCH_DIR = ".launches"
SEQ_RE = re.compile(r"[0-9]{6,}")
#: a sequence id, or the ``YYYYmmdd-HHMMSS-pid`` ids of launches made before sequences
LAUNCH_ID_RE = re.compile(rf"{SEQ_RE.pattern}|[0-9]{{8}}-[0-9]{{6}}-[0-9]+")
#: Grid axes of ``dpstudy sweep`` (option ``--models`` etc.) and the fields they set.
GRID_AXES = {"models": "model", "methods": "method", "noise_multipliers": "noise_multiplier",
             "target_epsilons": "target_epsilon", "max_grad_norms": "max_grad_norm",
             "seeds": "seed"}
#: Exit statuses of a process stopped by SIGINT/SIGTERM (the CLI's own, or the signal's).
CANCELLED_CODES = {130, 143, -signal.SIGINT, -signal.SIGTERM}
ERROR_PREFIX = "dpstudy: error: "
#: The launches this process started. Keeping their ``Popen`` objects lets polling reap
#: them (dropped ones would be reaped silently by ``subprocess``).
_CHILDREN: dict[int, subprocess.Popen] = {}


@functools.lru_cache(maxsize=None)
def cli_options(command: str) -> dict[str, argparse.Action]:
    """The options of ``dpstudy <command>`` by destination (a RunConfig field name for
    every setting): what the app can launch, with the CLI's own choices and help."""
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {a.dest: a for a in sub.choices[command]._actions
            if a.option_strings and a.dest != "help"}


def _flag(action: argparse.Action) -> str:
    return max(action.option_strings, key=len)


def _options(values: dict, command: str) -> list[str]:
    """``dpstudy <command>`` options that set ``values`` (RunConfig fields), every value
    explicit; ``--flag=value`` keeps a value that starts with ``-`` from being read as an
    option. A field the command has no option for must keep its default."""
    actions, defaults, args = cli_options(command), RunConfig(), []
    for name, value in values.items():
        action = actions.get(name)
        if action is None:
            if value != getattr(defaults, name):
                raise ConfigError(f"{name}={value!r}: `dpstudy {command}` has no option for "
                                  f"{name}, so it cannot be launched from the app")
            continue
        if value is None:
            continue
        if action.nargs == 0:  # a flag: --x, or --no-x where the option has one
            negative = [o for o in action.option_strings if o.startswith("--no-")]
            if value is True:
                args.append(action.option_strings[0])
            elif negative:
                args.append(negative[0])
        elif isinstance(value, (tuple, list)):
            args += [_flag(action), *map(str, value)]
        else:
            args.append(f"{_flag(action)}={value}")
    return args


def _fields(cfg: RunConfig, skip=()) -> dict:
    return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.name not in skip}


def train_argv(cfg: RunConfig) -> list[str]:
    """``dpstudy train`` arguments for one run."""
    return ["train", *_options(_fields(cfg), "train"), "--quiet"]


def sweep_argv(base: RunConfig, grid: dict[str, list], jobs: int = 1) -> list[str]:
    """``dpstudy sweep`` arguments: ``base`` for the shared options, ``grid`` (keys from
    :data:`GRID_AXES`) for the axes."""
    unknown = set(grid) - set(GRID_AXES)
    if unknown:
        raise ValueError(f"unknown grid axes {sorted(unknown)}; use {sorted(GRID_AXES)}")
    axes = [arg for axis, values in grid.items() if values
            for arg in (f"--{axis.replace('_', '-')}", *map(str, values))]
    skip = {field for axis, field in GRID_AXES.items()
            if field != "max_grad_norm" or grid.get(axis)}
    return ["sweep", *axes, f"--jobs={jobs}", *_options(_fields(base, skip), "sweep")]


def profile_argv(name: str, data: str, jobs: int = 1) -> list[str]:
    """``dpstudy sweep --profile NAME`` on ``data`` (a pretraining stays on the phantom)."""
    return ["sweep", f"--profile={name}", f"--data={data}", f"--jobs={jobs}"]


def _toml(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)  # a valid TOML basic string
    return "[" + ", ".join(map(_toml, value)) + "]"


def write_profile(root: Path | str, spec: dict) -> Path:
    """A study profile (``{"base": {}, "pretrain": {}, "grid": [{}]}``) as a TOML file in
    the store's launch folder, named by its content; returns its path."""
    lines = []
    for table in ("base", "pretrain"):
        lines += [f"[{table}]", *(f"{k} = {_toml(v)}" for k, v in spec.get(table, {}).items()),
                  ""]
    for grid in spec["grid"]:
        lines += ["[[grid]]", *(f"{k} = {_toml(v)}" for k, v in grid.items()), ""]
    text = "\n".join(lines)
    folder = launches_dir(RunStore(root).root.resolve()) / "profiles"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{hashlib.sha256(text.encode()).hexdigest()[:12]}.toml"
    path.write_text(text)
    return path


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


def _next_id(folder: Path) -> tuple[int, str]:
    """The next sequence number, claimed by creating its record file exclusively (two
    apps launching at once get different numbers)."""
    seq = 1 + max((int(p.stem) for p in folder.glob("*.json") if SEQ_RE.fullmatch(p.stem)),
                  default=0)
    while True:
        try:
            os.close(os.open(folder / f"{seq:06d}.json", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            return seq, f"{seq:06d}"
        except FileExistsError:
            seq += 1


def launch(args: list[str], root: Path | str | None = None, *, label: str | None = None,
           run_ids: list[str] = (), estimate_s: float | None = None) -> dict:
    """Start ``python -m dpstudy <args>`` writing into the store at ``root``.

    ``label`` says what it is in words, ``run_ids`` which runs it trains (for progress and
    results), ``estimate_s`` how long it was expected to take.
    """
    store = RunStore(root)
    folder = launches_dir(store.root.resolve())
    folder.mkdir(parents=True, exist_ok=True)
    seq, launch_id = _next_id(folder)
    argv = [sys.executable, "-m", "dpstudy", *args, f"--runs-dir={store.root.resolve()}"]
    with open(folder / f"{launch_id}.log", "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "dpstudy.supervise", str(folder / f"{launch_id}.exit"),
             *argv], stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True)
    _CHILDREN[proc.pid] = proc
    record = {"id": launch_id, "seq": seq, "kind": args[0], "label": label or args[0],
              "argv": argv, "run_ids": list(run_ids), "estimate_s": estimate_s,
              "pid": proc.pid, "start_time": _start_time(proc.pid), "started": time.time(),
              "returncode": None}
    atomic_write_json(folder / f"{launch_id}.json", record)
    return record


def _returncode(record: dict, path: Path) -> int | None:
    """The exit status the supervisor recorded (launches from before it kept theirs in
    the record); reaps the process if this process started it (no zombie)."""
    proc = _CHILDREN.get(record["pid"])
    if proc is not None and proc.poll() is not None:
        _CHILDREN.pop(record["pid"], None)
    try:
        return int(path.with_suffix(".exit").read_text())
    except (OSError, ValueError):
        return record.get("returncode")


def is_alive(record: dict) -> bool:
    return (record.get("returncode") is None and record.get("start_time") is not None
            and _start_time(record["pid"]) == record["start_time"])


def list_launches(root: Path | str | None = None) -> list[dict]:
    """Every launch of the store, newest first, with ``alive``, ``returncode`` and
    ``log`` (its path)."""
    folder = launches_dir(RunStore(root).root)
    records = []
    for path in folder.glob("*.json"):
        try:
            record = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue  # a launch being written, or half deleted: not worth an error
        record["returncode"] = _returncode(record, path)
        records.append({**record, "alive": is_alive(record),
                        "log": str(path.with_suffix(".log"))})
    return sorted(records, key=lambda r: (r.get("seq", 0), r.get("started", 0)), reverse=True)


def log_tail(record: dict, lines: int = 15) -> str:
    try:
        text = Path(record["log"]).read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def state(record: dict) -> tuple[str, str]:
    """``(state, reason)`` of a launch in words: running, completed, cancelled, failed
    (reason: the command's own one-line error) or stopped (no exit status recorded)."""
    if record["alive"]:
        return "running", ""
    code = record.get("returncode")
    if code == 0:
        return "completed", ""
    if code in CANCELLED_CODES:
        return "cancelled", ""
    errors = [line[len(ERROR_PREFIX):] for line in log_tail(record, 200).splitlines()
              if line.startswith(ERROR_PREFIX)]
    if code is None:
        return ("failed", errors[-1]) if errors else (
            "stopped", "ended without recording an exit status (killed?)")
    if errors:
        return "failed", errors[-1]
    if code < 0:
        return "failed", f"killed by {signal.Signals(-code).name}"
    return "failed", f"exit status {code}"


def owner(records: list[dict], pid: int | None) -> dict | None:
    """The running launch whose process group holds ``pid`` (a run's trainer), if any."""
    try:
        group = os.getpgid(int(pid))
    except (TypeError, ValueError, ProcessLookupError, PermissionError):
        return None
    return next((r for r in records if r["alive"] and r["pid"] == group), None)


def cancel_launch(root: Path | str | None, launch_id: str) -> None:
    """SIGTERM to the launch's whole process group (a sweep's workers included)."""
    if not LAUNCH_ID_RE.fullmatch(launch_id):
        raise StoreError(f"invalid launch id {launch_id!r}")
    path = launches_dir(RunStore(root).root) / f"{launch_id}.json"
    try:
        record = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise StoreError(f"{path}: cannot read launch ({exc})") from None
    record["returncode"] = _returncode(record, path)
    if not is_alive(record):
        raise StoreError(f"launch {launch_id} is not running")
    os.killpg(record["pid"], signal.SIGTERM)


def cancel_run(store: RunStore, run_id: str) -> None:
    """SIGTERM to the process training ``run_id``; the trainer records ``cancelled``.

    The store says ``running`` only while the run's lock is held, so the pid it
    records is live. A run that leads its own process group is stopped with its
    group; any other (an app launch's trainer, a sweep worker) alone, so a sweep goes on.
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
