"""Choosing and loading the data: explicit path, environment, ./data/DukeData, phantom."""

import re

import numpy as np
import pytest

from dpstudy.data.phantom import phantom_splits
from dpstudy.data.source import SYNTHETIC, fingerprint, load_data, resolve_data_spec
from dpstudy.errors import DataError


def fake_duke(root, counts=None):
    counts = {"train": 2, "val": 1} if counts is None else counts
    rng = np.random.default_rng(0)
    for split, n in counts.items():
        for sub in ("images", "masks"):
            (root / split / sub).mkdir(parents=True)
        for i in range(n):
            np.save(root / split / "images" / f"Subject_0{i}.npy", rng.integers(0, 256, (8, 6), dtype=np.uint8))
            np.save(root / split / "masks" / f"Subject_0{i}.npy", rng.integers(0, 10, (8, 6), dtype=np.uint8))
    return root


def test_resolve_order(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert resolve_data_spec(None) == SYNTHETIC
    fake_duke(tmp_path / "data" / "DukeData", {"test": 1})  # a test split alone does not count
    assert resolve_data_spec(None) == SYNTHETIC
    fake_duke(tmp_path / "data" / "DukeData", {"val": 1})
    assert resolve_data_spec(None) == str(tmp_path / "data" / "DukeData")
    monkeypatch.setenv("DPSTUDY_DATA", "/from/env")
    assert resolve_data_spec(None) == "/from/env"
    assert resolve_data_spec("") == "/from/env"
    assert resolve_data_spec("synthetic") == "synthetic"
    assert resolve_data_spec("my/dir") == "my/dir"


def test_missing_path_explains_the_options(tmp_path):
    with pytest.raises(DataError) as err:
        load_data(str(tmp_path / "absent"))
    msg = str(err.value)
    assert str(tmp_path / "absent") in msg and "--data synthetic" in msg and "dpstudy prepare-duke" in msg


def test_load_duke_folder(tmp_path, monkeypatch):
    fake_duke(tmp_path / "duke")
    monkeypatch.chdir(tmp_path)
    bundle = load_data("duke")
    assert bundle.kind == "duke" and bundle.spec == "duke" and bundle.root == str(tmp_path / "duke")
    assert {k: len(v) for k, v in bundle.splits.items()} == {"train": 2, "val": 1}
    assert bundle.describe() == f"Duke DME data at {tmp_path / 'duke'}: train 2, val 1"
    assert re.fullmatch(r"[0-9a-f]{16}", bundle.fingerprint)
    assert load_data("duke").fingerprint == bundle.fingerprint
    limited = load_data("duke", limit=1)
    assert {k: len(v) for k, v in limited.splits.items()} == {"train": 1, "val": 1}
    assert limited.fingerprint != bundle.fingerprint

    # one changed label changes the fingerprint
    mask_path = tmp_path / "duke" / "val" / "masks" / "Subject_00.npy"
    mask = np.load(mask_path)
    mask[0, 0] = (mask[0, 0] + 1) % 8
    np.save(mask_path, mask)
    assert load_data("duke").fingerprint != bundle.fingerprint


def test_load_synthetic():
    bundle = load_data(SYNTHETIC, limit=2)
    assert bundle.kind == "synthetic" and bundle.root is None
    assert {k: len(v) for k, v in bundle.splits.items()} == {"train": 2, "val": 2, "test": 2}
    assert bundle.describe() == (
        "synthetic OCT phantom (seed 0, standard): train 2, val 2, test 2 — no Duke data configured"
    )
    assert bundle.fingerprint == fingerprint(phantom_splits(0, 2, 2, 2))
    assert bundle.splits["train"][0].image.shape == (496, 512)
    with pytest.raises(DataError, match="limit=0"):
        load_data(SYNTHETIC, limit=0)


def test_real_duke_bundle(duke_root):
    bundle = load_data(str(duke_root))
    assert bundle.describe() == f"Duke DME data at {duke_root.resolve()}: train 66, val 22"
    assert load_data(str(duke_root), limit=3).describe().endswith("train 3, val 3")
