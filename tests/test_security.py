"""Names that reach a path are validated; checkpoints never unpickle code."""

import json
from pathlib import Path

import pytest
import torch

from _runs import TINY_ARGS, assert_one_line_error, cli, main, make_duke, write_run
from dpstudy.config import RunConfig
from dpstudy.errors import ConfigError, StoreError
from dpstudy.evaluate import evaluate_run
from dpstudy.models import build_model
from dpstudy.store import (RunStore, load_checkpoint, load_weights, read_predictions,
                           validate_run_id)

BAD_IDS = ["../x", "/etc", "a/b", "..", "", "a\x00b", ".", ".hidden", "x/../y", "a..b",
           "..\\x", "run\n", "run id", "~root", "x" * 201]
ENTRY_POINTS = {
    "RunStore.path": lambda store, rid: store.path(rid),
    "read_meta": lambda store, rid: store.read_meta(rid),
    "read_history": lambda store, rid: store.read_history(rid),
    "read_predictions": lambda store, rid: read_predictions(store, rid),
    "load_checkpoint": lambda store, rid: load_checkpoint(store, rid),
    "load_weights": lambda store, rid: load_weights(store, rid, build_model("unet", 8, 2)),
    "evaluate_run": lambda store, rid: evaluate_run(store.root, rid),
}


@pytest.fixture
def victim(tmp_path) -> Path:
    """A complete, readable run *outside* the store, next to it: what traversal would reach."""
    run_dir = write_run(tmp_path, "victim", checkpoint=True)
    assert RunStore(tmp_path).read_meta("victim")["status"] == "completed"
    (tmp_path / "store").mkdir()
    return run_dir


def test_valid_run_ids_pass():
    cfg = RunConfig(method="dp_sgd", noise_multiplier=1.5)
    for run_id in (cfg.run_id(), "a", "A.b_c-9", "x" * 200):
        assert validate_run_id(run_id) == run_id


@pytest.mark.parametrize("entry", ENTRY_POINTS)
@pytest.mark.parametrize("bad", BAD_IDS, ids=repr)
def test_every_store_entry_point_refuses_a_path_like_run_id(victim, entry, bad):
    store = RunStore(victim.parent / "store")
    with pytest.raises(StoreError, match="invalid run id") as err:
        ENTRY_POINTS[entry](store, bad)
    assert repr(bad) in str(err.value) and "letters, digits" in str(err.value)


@pytest.mark.parametrize("bad", [b for b in BAD_IDS if b], ids=repr)
def test_init_from_must_be_a_run_id(bad):
    with pytest.raises(ConfigError, match="must be a run id from the store"):
        RunConfig(init_from=bad)


def test_is_completed_of_a_bad_id_is_false_not_a_traversal(victim):
    assert RunStore(victim.parent / "store").is_completed("../victim") is False
    assert RunStore(victim.parent).is_completed("victim") is True


def test_cli_evaluate_stays_inside_the_store(victim, capsys):
    store = victim.parent / "store"
    for arg in ("../victim", str(victim)):      # a path names a run *of the store* by its name
        rc, _, err = main(capsys, "evaluate", arg, "--runs-dir", str(store))
        assert_one_line_error(rc, err, f"{store / 'victim' / 'config.json'}: no such run")
    r = cli("evaluate", "..", "--runs-dir", str(store))
    assert_one_line_error(r.returncode, r.stderr, "invalid run id '..'")


def test_cli_init_from_refuses_traversal_before_writing_anything(victim, capsys):
    store = victim.parent / "store"
    for bad in ("../victim", "..", "/etc"):
        rc, _, err = main(capsys, "train", *TINY_ARGS, "--epochs", "1", "--quiet",
                          "--init-from", bad, "--runs-dir", str(store))
        assert_one_line_error(rc, err, f"init_from={bad!r} must be a run id from the store")
    assert list(store.iterdir()) == []


MARKER = "pwned"


def _payload(path):
    """What an attacker's checkpoint would run on unpickling (here: leave a marker)."""
    Path(path).write_text("code ran")


class Exploit:
    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return _payload, (self.marker,)


@pytest.fixture
def evil_run(tmp_path) -> tuple[RunStore, str, Path]:
    """A completed-looking run whose model.pt unpickles to a function call."""
    store = RunStore(tmp_path / "store")
    run_dir = write_run(store.root, "evil")
    marker = tmp_path / MARKER
    torch.save({"conv.weight": Exploit(marker)}, run_dir / "model.pt")
    torch.load(run_dir / "model.pt", weights_only=False)      # the payload is live ...
    assert marker.read_text() == "code ran"
    marker.unlink()                                          # ... so now it must never run
    return store, "evil", marker


def test_a_pickled_object_in_a_checkpoint_is_refused_without_running_it(evil_run, tmp_path):
    store, run_id, marker = evil_run
    with pytest.raises(StoreError, match=r"model\.pt: cannot load checkpoint \(it holds a pickled "
                       r"Python object \(test_security\._payload\), not only tensors; refused\)"):
        load_checkpoint(store, run_id)
    with pytest.raises(StoreError, match="cannot load checkpoint"):
        load_weights(store, run_id, build_model("unet", 8, 2))
    with pytest.raises(StoreError, match="cannot load checkpoint"):
        evaluate_run(store.root, run_id, data=str(make_duke(tmp_path / "duke")))
    assert not marker.exists()


def test_cli_refuses_a_pickled_checkpoint_as_init_from(evil_run):
    store, run_id, marker = evil_run
    r = cli("train", *TINY_ARGS, "--epochs", "1", "--quiet", "--init-from", run_id,
            "--runs-dir", str(store.root))
    line = assert_one_line_error(r.returncode, r.stderr,
                                 "model.pt: cannot load checkpoint (it holds a pickled")
    assert "weights_only" not in line           # no advice to load it unsafely
    assert not marker.exists()
    assert sorted(p.name for p in store.root.iterdir()) == ["evil"]   # nothing trained
    assert json.loads((store.root / "evil" / "config.json").read_text())["status"] == "completed"
