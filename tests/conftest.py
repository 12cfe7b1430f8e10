"""Shared fixtures: the real Duke data (skipped where absent) and a clean environment;
every run reports how many real-data tests ran, so a run without the data says so."""

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
    if not path:
        pytest.skip("real Duke data not available (set DPSTUDY_DUKE_DIR)")
    if not (Path(path) / "train" / "images").is_dir():
        pytest.fail(f"DPSTUDY_DUKE_DIR={path} is not a prepared Duke folder (no train/images)",
                    pytrace=False)
    return Path(path)


def pytest_collection_modifyitems(items):
    """A test that uses the real data is a ``duke`` test, whether or not it says so."""
    for item in items:
        if "duke_root" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.duke)


def pytest_terminal_summary(terminalreporter):
    """One line: how many ``duke`` tests passed, failed or were skipped."""
    outcomes = {}
    for outcome in ("passed", "failed", "error", "skipped"):
        for report in terminalreporter.stats.get(outcome, []):
            if "duke" in getattr(report, "keywords", {}):
                outcomes.setdefault(outcome, set()).add(report.nodeid)
    counts = {k: len(v) for k, v in outcomes.items()}
    ran = counts.get("passed", 0) + counts.get("failed", 0)
    detail = ", ".join(f"{n} {k}" for k, n in counts.items())
    where = os.environ.get("DPSTUDY_DUKE_DIR") or "DPSTUDY_DUKE_DIR unset"
    terminalreporter.write_line(f"real Duke data ({where}): {ran} duke test(s) ran"
                                + (f" ({detail})" if detail else ""))
