"""Sweeps: a grid of run configs, trained in parallel, resumable.

A grid is a set of lists whose Cartesian product gives the runs. The privacy setting
is one axis: every value of ``noise_multiplier`` and every value of ``target_epsilon``
is one point on it, and ``non_dp`` runs take none. Completed runs are skipped, and a
run locked by another process (a concurrent sweep) is left to that process, so a sweep
can be stopped and restarted, or run twice at once, without training anything twice.
Study profiles are TOML files (``dpstudy/profiles/``) with a ``[base]`` table of
config fields, ``[[grid]]`` tables of lists and an optional ``[pretrain]`` table: a
grid with ``pretrained = true`` starts every run from a non-private run on public data
(the phantom), trained first in the same sweep.
"""

from __future__ import annotations

import itertools
import os
import tomllib
from pathlib import Path

import joblib

from .config import RunConfig
from .errors import Cancelled, ConfigError, DPStudyError, RunCompleted, RunLocked
from .store import RunStore

PROFILES_DIR = Path(__file__).parent / "profiles"
PRIVACY_KEYS = ("noise_multiplier", "target_epsilon")
#: Fields a pretraining run takes from the runs it initialises: the architecture, so its
#: weights fit them, and the image size, so the phantom's structures have the scale in
#: pixels that the runs will see.
INHERITED = ("model", "base_width", "depth", "image_size")


def expand_grid(base: dict, grid: dict) -> list[RunConfig]:
    """All configs of one grid, de-duplicated by run id, in a stable order."""
    grid = {k: (v if isinstance(v, list) else [v]) for k, v in grid.items()}
    privacy = [(k, v) for k in PRIVACY_KEYS for v in grid.pop(k, [])]
    keys = list(grid)
    configs: dict[str, RunConfig] = {}
    for values in itertools.product(*(grid[k] for k in keys)):
        point = {**base, **dict(zip(keys, values))}
        method = point.get("method", "non_dp")
        options = [None] if method == "non_dp" else (privacy or [None])
        for option in options:
            fields = {**point, "noise_multiplier": None, "target_epsilon": None}
            if option is not None:
                fields[option[0]] = option[1]
            elif method != "non_dp":
                fields = point
            cfg = RunConfig.from_dict(fields, where="sweep grid")
            configs.setdefault(cfg.run_id(), cfg)
    return list(configs.values())


def load_profile(name_or_path: str, overrides: dict | None = None,
                 seeds: list[int] | None = None) -> tuple[list[RunConfig], dict]:
    """Configs of a profile (a name in ``dpstudy/profiles`` or a TOML path) and its text.

    Pretraining runs come first. ``overrides`` (explicit command-line settings) win over
    the profile, except the data of a pretraining run, which is public by definition.
    ``seeds`` replaces every grid's seed list (pretraining keeps its own seed).
    """
    path = Path(name_or_path)
    if not path.suffix:
        path = PROFILES_DIR / f"{name_or_path}.toml"
    if not path.is_file():
        known = sorted(p.stem for p in PROFILES_DIR.glob("*.toml"))
        raise ConfigError(f"profile {name_or_path!r} not found ({path}); known profiles: {known}")
    try:
        spec = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML ({exc})") from None
    unknown = sorted(set(spec) - {"base", "pretrain", "grid"})
    if unknown:
        raise ConfigError(f"{path}: unknown table(s) {unknown}; use [base], [pretrain], [[grid]]")
    if "grid" not in spec:
        raise ConfigError(f"{path}: no [[grid]] table")
    overrides = overrides or {}
    pretrain: dict[str, RunConfig] = {}
    configs: dict[str, RunConfig] = {}
    for grid in spec["grid"]:
        grid = dict(grid) | ({"seed": list(seeds)} if seeds else {})
        flags = grid.pop("pretrained", False)
        for flag in flags if isinstance(flags, list) else [flags]:
            if flag not in (True, False):
                raise ConfigError(f"{path}: pretrained = {flags!r}; use true, false or a list")
            if flag and "pretrain" not in spec:
                raise ConfigError(f"{path}: a grid has pretrained = true but there is no "
                                  f"[pretrain] table")
            for cfg in expand_grid(spec.get("base", {}), grid):
                cfg = cfg.replace(**overrides)
                if flag:
                    pre = _pretrain_config(spec, cfg, overrides, path)
                    pretrain.setdefault(pre.run_id(), pre)
                    cfg = cfg.replace(init_from=pre.run_id())
                configs.setdefault(cfg.run_id(), cfg)
    rest = [c for run_id, c in configs.items() if run_id not in pretrain]
    return [*pretrain.values(), *rest], spec


def _pretrain_config(spec: dict, cfg: RunConfig, overrides: dict, path: Path) -> RunConfig:
    """The pretraining run of ``cfg``: [base] + [pretrain] (non-private, on the phantom
    unless it says otherwise), with ``cfg``'s architecture and image size."""
    fields = {**spec.get("base", {}), "method": "non_dp", "data": "synthetic",
              **spec["pretrain"], **{k: v for k, v in overrides.items() if k != "data"},
              **{k: getattr(cfg, k) for k in INHERITED}}
    pre = RunConfig.from_dict(fields, where=f"{path} [pretrain]")
    if cfg.private and not pre.data.split(":")[0] == "synthetic":
        raise ConfigError(f"{path} [pretrain]: data={pre.data!r} is not public; the private "
                          f"runs it starts would use weights their ε does not count "
                          f"(pretrain on 'synthetic')")
    if cfg.private and pre.init_from is not None:
        raise ConfigError(f"{path} [pretrain]: init_from={pre.init_from!r}; a pretraining run "
                          f"for private runs starts from scratch, so its provenance is known")
    return pre


def _phases(configs: list[RunConfig]) -> list[list[RunConfig]]:
    """Configs in waves: a run starting from another run's weights (``init_from``) comes
    in a later wave than that run, so it never starts before its checkpoint exists."""
    by_id = {c.run_id(): c for c in configs}

    def wave(c: RunConfig) -> int:
        return 0 if c.init_from not in by_id else 1 + wave(by_id[c.init_from])

    waves: dict[int, list[RunConfig]] = {}
    for c in configs:
        waves.setdefault(wave(c), []).append(c)
    return [waves[k] for k in sorted(waves)]


def _use_gpu(slot: int, device: str) -> None:
    """Put a CUDA run on GPU ``slot`` mod the GPUs this worker sees: with ``--jobs`` equal
    to the number of GPUs, one run per GPU (a Dask worker started per GPU with its own
    ``CUDA_VISIBLE_DEVICES`` sees one, so every run there uses it)."""
    import torch
    if device in ("auto", "cuda") and torch.cuda.is_available():
        torch.cuda.set_device(slot % torch.cuda.device_count())


def _train_one(cfg_dict: dict, runs_dir: str, threads: int, slot: int = 0) -> dict:
    """Worker: train one run; errors become a status, so one bad run never stops a sweep."""
    import torch

    from .train import train
    torch.set_num_threads(threads)
    cfg = RunConfig.from_dict(cfg_dict)
    _use_gpu(slot, cfg.device)
    run_id = cfg.run_id()
    try:
        train(cfg, runs_dir, progress=False, log=lambda *_: None, keep_completed=True)
    except RunCompleted:                          # another process finished it meanwhile
        return {"run_id": run_id, "status": "skipped (completed)"}
    except RunLocked as exc:
        return {"run_id": run_id, "status": "skipped (locked)", "error": str(exc)}
    except DPStudyError as exc:
        return {"run_id": run_id, "status": "failed", "error": str(exc)}
    except Cancelled:
        raise  # SIGTERM/SIGINT stops the whole sweep, not just the run it was training
    except Exception as exc:  # noqa: BLE001 — recorded in the run; the sweep goes on
        return {"run_id": run_id, "status": "failed", "error": f"{type(exc).__name__}: {exc}"}
    return {"run_id": run_id, "status": "completed"}


def run_sweep(configs: list[RunConfig], runs_dir: Path | str, jobs: int = 1,
              scheduler: str | None = None, progress: bool = True) -> list[dict]:
    """Train every config not yet completed, in waves (:func:`_phases`) so pretraining
    runs finish before the runs they start; ``scheduler`` sends runs to a Dask cluster."""
    store = RunStore(runs_dir)
    done = [c.run_id() for c in configs if store.is_completed(c.run_id())]
    completed = set(done)
    todo = [c for c in configs if c.run_id() not in completed]
    results = [{"run_id": run_id, "status": "skipped (completed)"} for run_id in done]
    threads = max(1, (os.cpu_count() or 1) // max(jobs, 1))
    verbose = 10 if progress else 0
    for wave in _phases(todo):
        tasks = (joblib.delayed(_train_one)(c.to_dict(), str(Path(runs_dir).resolve()), threads,
                                            slot) for slot, c in enumerate(wave))
        if scheduler:
            from distributed import Client
            with Client(scheduler), joblib.parallel_config(backend="dask"):
                results += joblib.Parallel(verbose=verbose)(tasks)
        else:
            results += joblib.Parallel(n_jobs=jobs, verbose=verbose)(tasks)
    return results
