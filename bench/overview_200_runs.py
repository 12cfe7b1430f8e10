"""How the Overview page scales with the run store: 20 runs against 200.

Fabricates two stores of real run directories (``config.json`` written by ``RunWriter``,
``history.csv`` by the store's atomic writer, 10 epochs each), then times, for each:

* ``list_runs()`` alone (the data preparation, uncached);
* the Overview page in ``AppTest``, cold (empty cache: read + render), warm (cached
  rerun: every widget change) and after one run changed (a run training: every epoch).

Usage: ``.venv/bin/python bench/overview_200_runs.py`` (about half a minute).
"""

import itertools
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # dpstudy (and dpstudy.ui) from this checkout, installed or not

from dpstudy.classes import CLASS_SLUGS  # noqa: E402
from dpstudy.config import METHODS, MODELS, RunConfig  # noqa: E402
from dpstudy.store import HISTORY, RunStore, RunWriter, atomic_write_bytes  # noqa: E402

EPOCHS = 10
SIGMAS = (0.5, 0.8, 1.0, 1.5, 2.0)
DATA = {"kind": "synthetic", "spec": "synthetic", "fingerprint": "bench0000000000",
        "description": "fabricated for the benchmark", "root": None}


def fabricate(root: Path, n: int) -> None:
    """``n`` completed runs with varied model, method, σ and seed."""
    store, rng = RunStore(root), np.random.default_rng(n)
    grid = itertools.product(range(n), MODELS, METHODS, SIGMAS)
    configs = {}
    for seed, model, method, sigma in grid:
        cfg = RunConfig(model=model, method=method, seed=seed,
                        noise_multiplier=None if method == "non_dp" else sigma)
        configs.setdefault(cfg.run_id(), cfg)
        if len(configs) == n:
            break
    for run_id, cfg in configs.items():
        eps = None if not cfg.private else float(8 / cfg.noise_multiplier)
        writer = RunWriter(store, run_id, {
            "config": cfg.to_dict(), "data": DATA, "private": cfg.private,
            "sample_rate": 0.02, "noise_multiplier": cfg.noise_multiplier,
            "delta": 1e-5 if cfg.private else None, "steps": 50 * EPOCHS, "epsilon": eps})
        epochs = np.arange(1, EPOCHS + 1)
        history = pd.DataFrame({
            "epoch": epochs, "train_loss": 2 / epochs, "val_loss": 2.1 / epochs,
            **{f"val_dice_{s}": rng.uniform(0.3, 0.9, EPOCHS) for s in CLASS_SLUGS},
            "val_dice_fg_mean": rng.uniform(0.3, 0.9, EPOCHS),
            "val_dice_all_mean": rng.uniform(0.3, 0.9, EPOCHS),
            "val_pixel_accuracy": rng.uniform(0.8, 1.0, EPOCHS),
            "epsilon": (eps or np.nan) * epochs / EPOCHS, "steps": 50 * epochs,
            "grad_norm_median": rng.uniform(1, 5, EPOCHS),
            "clipped_fraction": rng.uniform(0, 1, EPOCHS), "sparsity": np.nan,
            "lr": 2e-3, "epoch_seconds": 30.0})
        for row in history.to_dict("records"):
            writer.append_history(row)
        writer.finish("completed")


def median_of(fn, repeat: int = 5) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def time_store(root: Path) -> dict:
    import os

    from streamlit.testing.v1 import AppTest
    os.environ["DPSTUDY_RUNS"] = str(root)
    at = AppTest.from_file(str(REPO / "streamlit_app.py"), default_timeout=60)
    t0 = time.perf_counter()
    at.run()
    cold = time.perf_counter() - t0
    assert not at.exception, at.exception
    shown = len(at.dataframe[0].value)
    one = RunStore(root).path(RunStore(root).run_ids()[0]) / HISTORY

    def one_run_changed():
        atomic_write_bytes(one, one.read_bytes())  # what a trainer does after an epoch
        at.run()
    return {"list_runs_s": median_of(lambda: RunStore(root).list_runs(), 3),
            "app_cold_s": cold, "app_warm_s": median_of(at.run),
            "app_one_changed_s": median_of(one_run_changed), "rows_shown": shown}


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        for n in (1, 20, 200):
            fabricate(tmp / f"runs{n}", n)
        print(f"fabricated 221 runs in {time.perf_counter() - t0:.1f} s")
        time_store(tmp / "runs1")  # imports and the first script run, outside the timings
        results = {n: time_store(tmp / f"runs{n}") for n in (20, 200)}
    table = pd.DataFrame(results).T
    table.index.name = "runs"
    print(table.to_string(float_format=lambda v: f"{v:.3f}"))
    ratio = table.loc[200] / table.loc[20]
    print("ratio 200/20: " + ", ".join(f"{k} {ratio[k]:.1f}x" for k in
                                       ("list_runs_s", "app_cold_s", "app_warm_s",
                                        "app_one_changed_s")))
    verdict = "OK" if table.loc[200, "app_cold_s"] < 1.0 else "SLOW"
    print(f"{verdict}: overview of 200 runs renders in {table.loc[200, 'app_cold_s']:.3f} s "
          f"cold, {table.loc[200, 'app_warm_s']:.3f} s warm (target < 1 s)")


if __name__ == "__main__":
    main()
