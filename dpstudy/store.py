"""The run store: one directory per run, written atomically, read without checkpoints.

Layout of ``<root>/<run_id>/`` (the README documents every field):

* ``config.json`` — the run's config, data fingerprint, privacy parameters, package
  versions and ``status`` (``running``, ``completed``, ``failed``, ``cancelled``);
* ``history.csv`` — one row per epoch;
* ``model.pt`` — the final ``state_dict`` (loaded with ``weights_only=True``);
* ``predictions.h5`` — per validation B-scan: image, ground truth, prediction (uint8);
* ``.lock`` — held (``flock``) by the process training the run. A run whose status
  says ``running`` but whose lock is free was killed: it reads as ``interrupted``.

Every file is written to a temporary name and renamed, so a reader never sees half a
file and a crash never destroys what was saved before.
"""

from __future__ import annotations

import fcntl
import io
import json
import os
import re
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import torch

from .config import HASH_NEUTRAL_DEFAULTS
from .errors import RunCompleted, RunLocked, StoreError

RUN_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}")
CONFIG, HISTORY, CHECKPOINT, PREDICTIONS, LOCK = (
    "config.json", "history.csv", "model.pt", "predictions.h5", ".lock")
FINAL_STATUSES = ("completed", "failed", "cancelled")
#: history columns computed from the private training split without noise: in a private
#: run they are diagnostics, not covered by ε (listed as such in its config.json), and
#: are kept out of published result tables
DIAGNOSTIC_FIELDS = ("train_loss", "grad_norm_median", "clipped_fraction")


def default_runs_dir() -> Path:
    """``$DPSTUDY_RUNS`` or ``runs/``: one store shared by the CLI, the app and tests."""
    return Path(os.environ.get("DPSTUDY_RUNS") or "runs")


def validate_run_id(run_id: str) -> str:
    """Run ids become path components: no separators, no ``..``, nothing absolute."""
    if not isinstance(run_id, str) or not RUN_ID_RE.fullmatch(run_id) or ".." in run_id:
        raise StoreError(f"invalid run id {run_id!r}: use letters, digits, '.', '_' and '-' "
                         f"only (no path separators or '..')")
    return run_id


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True, default=_jsonable)
                              + "\n").encode())


def _jsonable(o):
    if isinstance(o, (np.integer, np.floating)):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def _lock_is_held(lock_path: Path) -> bool:
    try:
        fd = os.open(lock_path, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # closing releases a lock we may just have taken
    return False


class RunLock:
    """Exclusive per-run lock; the OS releases it when the holder dies, even by SIGKILL."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK
        self.fd = None

    #: Readers take the lock for an instant to tell a live run from a dead one; a trainer
    #: retries this long before concluding that another trainer holds it.
    PATIENCE_S = 0.5

    def acquire(self) -> "RunLock":
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.monotonic() + self.PATIENCE_S
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() < deadline:
                    time.sleep(0.02)
                    continue
                os.close(fd)
                raise RunLocked(
                    f"run {self.path.parent.name} is being trained by another process") from None
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


class RunStore:
    """A directory of runs. Every path it touches comes from a validated run id."""

    def __init__(self, root: Path | str | None = None):
        self.root = Path(root) if root is not None else default_runs_dir()

    def path(self, run_id: str) -> Path:
        return self.root / validate_run_id(run_id)

    def run_ids(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir()
                      if p.is_dir() and RUN_ID_RE.fullmatch(p.name) and (p / CONFIG).exists())

    def read_meta(self, run_id: str) -> dict:
        """config.json with the *effective* status (a dead ``running`` is ``interrupted``)."""
        path = self.path(run_id) / CONFIG
        try:
            meta = json.loads(path.read_text())
        except FileNotFoundError:
            raise StoreError(f"{path}: no such run (missing config.json)") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise StoreError(f"{path}: corrupt JSON ({exc}); the run cannot be read") from None
        if not isinstance(meta, dict) or not isinstance(meta.get("config"), dict):
            raise StoreError(f"{path}: missing the 'config' object; not a dpstudy run")
        if meta.get("status") == "running" and not _lock_is_held(path.parent / LOCK):
            meta["status"] = "interrupted"
            meta.setdefault("error", "the training process died without finishing")
        return meta

    def read_history(self, run_id: str) -> pd.DataFrame:
        path = self.path(run_id) / HISTORY
        if not path.exists():
            return pd.DataFrame()
        try:
            df = pd.read_csv(path)
        except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
            raise StoreError(f"{path}: corrupt history ({str(exc).strip()})") from None
        if "epoch" not in df.columns:
            raise StoreError(f"{path}: corrupt history (no 'epoch' column)")
        return df

    def is_completed(self, run_id: str) -> bool:
        try:
            return self.read_meta(run_id).get("status") == "completed"
        except StoreError:
            return False

    def list_runs(self) -> pd.DataFrame:
        """One row per run: config, privacy parameters and final metrics.

        Broken runs are listed with status ``broken`` and the error, never raised.
        """
        rows = []
        for run_id in self.run_ids():
            try:
                meta = self.read_meta(run_id)
                hist = self.read_history(run_id)
            except StoreError as exc:
                rows.append({"run_id": run_id, "status": "broken", "error": str(exc)})
                continue
            row = {"run_id": run_id, **HASH_NEUTRAL_DEFAULTS, **meta["config"]}
            for key in ("status", "error", "created", "updated", "duration_s", "sample_rate",
                        "noise_multiplier", "delta", "steps", "epsilon", "n_params",
                        "epochs_done"):
                row[key] = meta.get(key)
            row["data_kind"] = (meta.get("data") or {}).get("kind")
            row["data_fingerprint"] = (meta.get("data") or {}).get("fingerprint")
            row["data_description"] = (meta.get("data") or {}).get("description")
            audit = meta.get("audit") or {}
            row["mia_auc"] = audit.get("auc")
            row["mia_same_subjects"] = audit.get("same_subjects")
            row["mia_reference_auc"] = audit.get("reference_auc")
            row["mia_auc_gain"] = audit.get("auc_gain")
            row["mia_verdict"] = audit.get("verdict")
            one_run = meta.get("one_run_audit") or {}
            row["epsilon_lower_bound"] = one_run.get("epsilon_lower_bound")
            for subject, dice in (meta.get("val_dice_fg_by_subject") or {}).items():
                row[f"val_dice_fg_{subject}"] = dice
            if len(hist):
                last = hist.iloc[-1]
                for col in hist.columns:
                    if col.startswith(("val_", "train_")):
                        row[col] = last[col]
            rows.append(row)
        df = pd.DataFrame(rows)
        if "image_size" in df.columns:
            df["image_size"] = df["image_size"].map(
                lambda v: "x".join(map(str, v)) if isinstance(v, (list, tuple)) else v)
        return df


class RunWriter:
    """Owns one run directory while it trains: lock, status, history, artefacts."""

    def __init__(self, store: RunStore, run_id: str, meta: dict, keep_completed: bool = False):
        self.store = store
        self.run_id = run_id
        self.dir = store.path(run_id)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.lock = RunLock(self.dir).acquire()
        if keep_completed and store.is_completed(run_id):  # re-checked under the lock
            self.lock.release()
            raise RunCompleted(f"run {run_id} is already completed ({self.dir}); train it "
                             f"again with --force, which replaces its results")
        self.meta = {**meta, "run_id": run_id, "status": "running", "error": None,
                     "pid": os.getpid(), "created": time.time()}
        self.meta["updated"] = self.meta["created"]
        self.rows: list[dict] = []
        for stale in (HISTORY, CHECKPOINT, PREDICTIONS):  # a re-run starts anew: no result
            (self.dir / stale).unlink(missing_ok=True)    # of an earlier attempt survives
        self.update()

    def update(self, **fields) -> None:
        self.meta.update(fields)
        self.meta["updated"] = time.time()
        atomic_write_json(self.dir / CONFIG, self.meta)

    def append_history(self, row: dict) -> None:
        rows = [*self.rows, row]    # kept only once written: rows == what history.csv holds
        atomic_write_bytes(self.dir / HISTORY, pd.DataFrame(rows).to_csv(index=False).encode())
        self.rows = rows

    def save_checkpoint(self, state_dict: dict) -> None:
        buf = io.BytesIO()
        torch.save(state_dict, buf)
        atomic_write_bytes(self.dir / CHECKPOINT, buf.getvalue())

    def save_predictions(self, split: str, names, images, masks, preds) -> None:
        fd, tmp = tempfile.mkstemp(dir=self.dir, prefix=".predictions.", suffix=".tmp")
        os.close(fd)
        try:
            with h5py.File(tmp, "w") as f:
                g = f.create_group(split)
                for name, img, mask, pred in zip(names, images, masks, preds):
                    s = g.create_group(name)
                    s.create_dataset("image", data=np.asarray(img, dtype=np.uint8), compression="gzip")
                    s.create_dataset("mask", data=np.asarray(mask, dtype=np.uint8), compression="gzip")
                    s.create_dataset("pred", data=np.asarray(pred, dtype=np.uint8), compression="gzip")
            os.replace(tmp, self.dir / PREDICTIONS)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def finish(self, status: str, error: str | None = None) -> None:
        # epochs_done from the history itself: a signal may land between the two writes
        self.update(status=status, error=error, duration_s=time.time() - self.meta["created"],
                    epochs_done=len(self.rows))
        self.lock.release()


def load_weights(store: RunStore, run_id: str, model: torch.nn.Module) -> None:
    """Load a run's checkpoint into ``model``; a checkpoint of another architecture is a
    clear error rather than PyTorch's list of missing keys."""
    state = load_checkpoint(store, run_id)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        cfg = store.read_meta(run_id)["config"]
        raise StoreError(
            f"{store.path(run_id) / CHECKPOINT}: checkpoint of a {cfg.get('model')} "
            f"(base_width {cfg.get('base_width')}, depth {cfg.get('depth')}) does not fit "
            f"{type(model).__name__}: {str(exc).splitlines()[0]}") from None


def load_checkpoint(store: RunStore, run_id: str) -> dict:
    """The run's ``state_dict``; never unpickles arbitrary objects."""
    path = store.path(run_id) / CHECKPOINT
    if not path.exists():
        raise StoreError(f"{path}: run {run_id} has no checkpoint (status: "
                         f"{store.read_meta(run_id).get('status')})")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 — any unpickling failure means a bad file
        # torch's refusal spans many lines and suggests weights_only=False: keep the gist
        refused = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))
        detail = (f"it holds a pickled Python object ({refused.group(1)}), not only tensors; "
                  f"refused" if refused else (str(exc).strip().splitlines() or [""])[0])
        raise StoreError(f"{path}: cannot load checkpoint ({detail})") from None


def read_predictions(store: RunStore, run_id: str, split: str = "val") -> dict[str, dict]:
    """{name: {"image", "mask", "pred"}} for one split of a run's saved predictions."""
    path = store.path(run_id) / PREDICTIONS
    if not path.exists():
        raise StoreError(f"{path}: run {run_id} has no saved predictions")
    try:
        with h5py.File(path, "r") as f:
            if split not in f:
                raise StoreError(f"{path}: no predictions for split {split!r} "
                                 f"(has {sorted(f.keys())})")
            return {name: {k: g[k][()] for k in ("image", "mask", "pred")}
                    for name, g in f[split].items()}
    except OSError as exc:
        raise StoreError(f"{path}: corrupt predictions file ({exc})") from None
