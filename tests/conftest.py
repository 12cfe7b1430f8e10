"""Shared fixtures: the real Duke data (skipped where absent) and a clean environment."""

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
_MAIN_MODULE = sys.modules["__main__"]


@pytest.fixture(autouse=True)
def _main_module_restored():
    """AppTest installs the app script as ``__main__`` and leaves it there (also from
    module-scoped fixtures); processes spawned later (Dask workers) would re-run the app
    on start-up. Every test ends with pytest's own ``__main__`` back in place."""
    yield
    sys.modules["__main__"] = _MAIN_MODULE


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch):
    """Tests never pick up a user's data or run-store settings by accident, nor write
    the phantom cache into the home folder."""
    monkeypatch.delenv("DPSTUDY_DATA", raising=False)
    monkeypatch.delenv("DPSTUDY_RUNS", raising=False)
    monkeypatch.setenv("DPSTUDY_CACHE", "off")


@pytest.fixture(scope="session")
def duke_root() -> Path:
    """The real Duke data, from ``DPSTUDY_DUKE_DIR`` (``.ci/run`` sets it)."""
    path = os.environ.get("DPSTUDY_DUKE_DIR")
    if not path or not (Path(path) / "train" / "images").is_dir():
        pytest.skip("real Duke data not available (set DPSTUDY_DUKE_DIR)")
    return Path(path)
