"""The step benchmark runs and reports what the README's Speed table reads from it."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench" / "dp_step.py"


@pytest.mark.slow   # builds and steps 13 small models: ≈ 10 s
def test_bench_times_both_per_sample_conv_paths_against_the_fastest_non_private_step(tmp_path):
    r = subprocess.run([sys.executable, str(BENCH), "--quick", "--models", "unet", "--formats",
                        "channels_last", "--conv-paths", "loop", "grouped", "--device", "cpu",
                        "--out", str(tmp_path)], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    rows = json.loads((tmp_path / "dp_step.json").read_text())["results"]
    private = [row for row in rows if row["method"] != "non_dp"]
    assert {(row["grad_sample_mode"], row["conv_path"]) for row in private} == {
        (mode, path) for mode in ("native_conv", "ghost_mixed") for path in ("loop", "grouped")}
    assert len(private) == 12 and all(row["total_ms"] > 0 for row in rows)
    baseline = next(row for row in rows if row["method"] == "non_dp")
    assert baseline["ratio"] == 1.0 and baseline["conv_path"] == "-"
    for row in private:   # each ratio is its step time over the non-private one
        assert row["ratio"] == pytest.approx(row["total_ms"] / baseline["total_ms"])
