"""Bad input gets a clear error naming what is wrong and what is valid; nothing saved is lost.

Each row of ``CASES`` is one bad input and the exact error it gets. Messages are checked
for the file, field or value at fault and for what would be valid. ``{tmp}``, ``{root}``
(a prepared-Duke folder) and ``{run}`` (a run directory) stand for this test's paths.
"""

import json
import shutil
from functools import cached_property
from pathlib import Path

import numpy as np
import pytest
import scipy.io

import dpstudy.train
from _runs import (TINY, TINY_ARGS, assert_one_line_error, cli, main, make_duke, quiet,
                   snapshot, write_run)
from _runs import one_thread  # noqa: F401 — a fixture, used below
from dpstudy.config import RunConfig
from dpstudy.data.prepare import prepare_duke
from dpstudy.data.source import load_data
from dpstudy.errors import ConfigError, DataError, StoreError
from dpstudy.models import build_model
from dpstudy.store import RunStore, load_checkpoint, load_weights, read_predictions
from dpstudy.train import train

F = "Subject_01_00.npy"
IMG, MSK = f"train/images/{F}", f"train/masks/{F}"
VALID_LABELS = "expected integers 0..9"


class Ctx:
    """Paths of one case; the Duke folder and the run store are made on first use."""

    def __init__(self, tmp: Path):
        self.tmp, self.root, self.run = tmp, tmp / "duke", tmp / "store" / "r1"

    @cached_property
    def duke(self) -> Path:
        return make_duke(self.root)

    @cached_property
    def store(self) -> RunStore:
        write_run(self.run.parent, "r1", checkpoint=True)
        return RunStore(self.run.parent)


def _data(mutate):
    """Load a valid Duke folder after ``mutate(root)`` broke it."""
    def action(c: Ctx):
        mutate(c.duke)
        load_data(str(c.duke))
    return action


def _save(rel: str, array, **kw):
    return _data(lambda root: np.save(root / rel, array, **kw))


def _remove(rel: str):
    def mutate(root):
        path = root / rel
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    return _data(mutate)


def _empty_images(root):
    for p in (root / "train" / "images").iterdir():
        p.unlink()


def _truncate(root):
    data = (root / IMG).read_bytes()
    (root / IMG).write_bytes(data[: len(data) // 3])


def _npz(root):
    with open(root / IMG, "wb") as f:
        np.savez(f, image=np.zeros((40, 36), np.uint8))


def _mat(drop: str = "", layers_shape=(8, 20, 2), garbage: bool = False):
    """prepare_duke on one Subject_01.mat, missing a field or malformed."""
    def action(c: Ctx):
        src = c.tmp / "mat"
        src.mkdir()
        if garbage:
            (src / "Subject_01.mat").write_bytes(b"MATLAB 5.0 MAT-file, truncated")
        else:
            fields = {"images": np.zeros((20, 20, 2), np.uint8),
                      "manualLayers1": np.full(layers_shape, 5.0),
                      "manualFluid1": np.zeros((20, 20, 2))}
            fields.pop(drop, None)
            scipy.io.savemat(src / "Subject_01.mat", fields)
        prepare_duke(src, c.tmp / "out", {"train": [1]})
    return action


def _config(**fields):
    return lambda c: RunConfig(**fields)


def _train(**fields):
    return lambda c: train(RunConfig(**{**TINY, **fields}), c.tmp / "runs", progress=False,
                           log=quiet)


def _store(write: str, content: bytes, read):
    """Corrupt one file of a stored run, then read it back."""
    def action(c: Ctx):
        c.store.path("r1").joinpath(write).write_bytes(content)
        read(c.store)
    return action


DP = dict(method="dp_sgd", noise_multiplier=1.0)
CASES = [
    # -- data folders and files -------------------------------------------------------
    ("data folder missing", lambda c: load_data(str(c.tmp / "nope")), DataError,
     ["data folder {tmp}/nope does not exist", "use --data synthetic", "dpstudy prepare-duke"]),
    ("data folder empty", lambda c: (c.root.mkdir(), load_data(str(c.root))), DataError,
     ["Duke data folder {root} holds none of the splits train, val, test",
      "expected <root>/<split>/images/<name>.npy"]),
    ("split with an empty images folder", _data(_empty_images), DataError,
     ["split folder {root}/train/images is empty", "expected <root>/<split>/images"]),
    ("split with images but no masks folder", _remove("train/masks"), DataError,
     ["{root}/train/images has images but {root}/train/masks does not exist"]),
    ("image without its mask", _remove(MSK), DataError,
     ["image {root}/" + IMG + " has no mask: {root}/" + MSK + " does not exist"]),
    ("image and mask of different shapes", _save(MSK, np.zeros((40, 30), np.uint8)), DataError,
     ["{root}/" + IMG + " has shape (40, 36) but its mask {root}/" + MSK
      + " has shape (40, 30); they must match pixel for pixel"]),
    ("labels above 9", _save(MSK, np.tile(np.array([0, 10, 12, 3], np.uint8), (40, 9))),
     DataError,
     ["{root}/" + MSK + ": labels [10, 12] are out of range; " + VALID_LABELS]),
    ("negative labels", _save(MSK, np.full((40, 36), -1, np.int16)), DataError,
     ["{root}/" + MSK + ": labels [-1] are out of range; " + VALID_LABELS]),
    ("NaN labels", _save(MSK, np.full((40, 36), np.nan, np.float32)), DataError,
     ["{root}/" + MSK + ": labels contain NaN or infinity; " + VALID_LABELS]),
    ("non-integer labels", _save(MSK, np.full((40, 36), 2.5)), DataError,
     ["{root}/" + MSK + ": label 2.5 is not a whole number; " + VALID_LABELS]),
    ("text labels", _save(MSK, np.full((40, 36), "a")), DataError,
     ["{root}/" + MSK + ": labels have dtype <U1; " + VALID_LABELS]),
    ("a non-.npy file among the images",
     _data(lambda root: (root / "train/images/notes.txt").write_text("hi")), DataError,
     ["{root}/train/images/notes.txt is not a .npy file; {root}/train/images must hold only "
      ".npy B-scans"]),
    ("truncated .npy", _data(_truncate), DataError,
     ["{root}/" + IMG + " is not a readable .npy array", "re-create it with numpy.save"]),
    ("pickled object array in a .npy", _save(IMG, np.array([{"x": 1}]), allow_pickle=True),
     DataError, ["{root}/" + IMG + " is not a readable .npy array",
                 "allow_pickle=False", "plain numeric arrays only"]),
    (".npz archive under a .npy name", _data(_npz), DataError,
     ["{root}/" + IMG + " holds a .npz archive, not a .npy array; save each B-scan with "
      "numpy.save"]),
    ("3-D image", _save(IMG, np.zeros((40, 36, 3), np.uint8)), DataError,
     ["{root}/" + IMG + " has shape (40, 36, 3); expected a 2-D array (rows, columns)"]),
    ("3-D mask", _save(MSK, np.zeros((1, 40, 36), np.uint8)), DataError,
     ["{root}/" + MSK + " has shape (1, 40, 36); expected a 2-D array"]),
    ("zero-size image", _save(IMG, np.zeros((0, 36), np.uint8)), DataError,
     ["{root}/" + IMG + " is empty (shape (0, 36)); expected a 2-D B-scan"]),
    ("NaN intensities", _save(IMG, np.full((40, 36), np.nan, np.float32)), DataError,
     ["{root}/" + IMG + ": intensities must be finite numbers"]),
    # -- prepare-duke ----------------------------------------------------------------
    (".mat without manualLayers1", _mat(drop="manualLayers1"), DataError,
     ["{tmp}/mat/Subject_01.mat has no field 'manualLayers1'; a Duke DME subject file has "
      "images, manualLayers1, manualFluid1"]),
    (".mat that is not a MATLAB file", _mat(garbage=True), DataError,
     ["{tmp}/mat/Subject_01.mat is not a readable MATLAB file", "re-download"]),
    (".mat with 7 boundaries", _mat(layers_shape=(7, 20, 2)), DataError,
     ["{tmp}/mat/Subject_01.mat: field 'manualLayers1' has shape (7, 20, 2); expected "
      "(8, 20, 2)"]),
    ("prepare-duke source missing", lambda c: prepare_duke(c.tmp / "nope", c.tmp / "out"),
     DataError, ["Duke source folder {tmp}/nope does not exist",
                 "Subject_01.mat … Subject_10.mat"]),
    ("a subject in two splits",
     lambda c: prepare_duke(c.tmp, c.tmp / "out", {"train": [1, 2], "val": [2]}), DataError,
     ["subject 2 is in both 'train' and 'val'", "must stay in one split"]),
    # -- run configuration -----------------------------------------------------------
    ("negative noise multiplier", _config(method="dp_sgd", noise_multiplier=-1.0), ConfigError,
     ["noise_multiplier=-1.0 must be a finite number > 0"]),
    ("zero noise multiplier", _config(method="auto_clip", noise_multiplier=0.0), ConfigError,
     ["noise_multiplier=0.0 must be a finite number > 0"]),
    ("NaN noise multiplier", _config(method="dp_sgd", noise_multiplier=float("nan")),
     ConfigError, ["noise_multiplier=nan must be a finite number > 0"]),
    ("zero max_grad_norm", _config(**DP, max_grad_norm=0.0), ConfigError,
     ["max_grad_norm=0.0 must be a finite number > 0"]),
    ("negative max_grad_norm", _config(**DP, max_grad_norm=-2.0), ConfigError,
     ["max_grad_norm=-2.0 must be a finite number > 0"]),
    ("infinite max_grad_norm (no clipping)", _config(**DP, max_grad_norm=float("inf")),
     ConfigError, ["max_grad_norm=inf must be a finite number > 0"]),
    ("final_rate 1", _config(method="random_sparsification", noise_multiplier=1.0,
                             final_rate=1.0), ConfigError,
     ["final_rate=1.0 must lie in [0, 1)"]),
    ("negative final_rate", _config(method="random_sparsification", noise_multiplier=1.0,
                                    final_rate=-0.1), ConfigError,
     ["final_rate=-0.1 must lie in [0, 1)"]),
    ("zero target epsilon", _config(method="dp_sgd", target_epsilon=0.0), ConfigError,
     ["target_epsilon=0.0 must be a finite number > 0"]),
    ("negative target epsilon", _config(method="dp_sgd", target_epsilon=-3.0), ConfigError,
     ["target_epsilon=-3.0 must be a finite number > 0"]),
    ("DP method without a noise setting", _config(method="dp_sgd"), ConfigError,
     ["method dp_sgd needs exactly one of noise_multiplier (--noise-multiplier) or "
      "target_epsilon (--target-epsilon)"]),
    ("DP method with both noise settings",
     _config(method="dp_sgd", noise_multiplier=1.0, target_epsilon=3.0), ConfigError,
     ["needs exactly one of noise_multiplier"]),
    ("non_dp with a noise multiplier", _config(noise_multiplier=1.0), ConfigError,
     ["method non_dp takes no noise_multiplier or target_epsilon"]),
    ("delta 1", _config(**DP, delta=1.0), ConfigError, ["delta=1.0 must lie in (0, 1)"]),
    ("NaN gamma", _config(method="auto_clip", noise_multiplier=1.0, gamma=float("nan")),
     ConfigError, ["gamma=nan must be ≥ 0"]),
    ("unknown model", _config(model="resnet"), ConfigError,
     ["model='resnet' is not valid; choose one of unet, nested_unet"]),
    ("unknown method", _config(method="dpsgd"), ConfigError,
     ["method='dpsgd' is not valid; choose one of non_dp, dp_sgd, auto_clip, "
      "random_sparsification"]),
    ("image size not divisible by 2**depth", _config(image_size=(30, 32), depth=2), ConfigError,
     ["image_size 30x32: 30 is not divisible by 4 (2**depth, depth=2); use e.g. 28 or 32"]),
    ("image size not divisible, depth 4", _config(image_size=(128, 100)), ConfigError,
     ["image_size 128x100: 100 is not divisible by 16 (2**depth, depth=4); use e.g. 96 or 112"]),
    ("zero batch size", _config(batch_size=0), ConfigError,
     ["batch_size=0 must be an integer ≥ 1"]),
    ("unknown config field", lambda c: RunConfig.from_dict({"modle": "unet"}, "x.json"),
     ConfigError, ["x.json: unknown field(s) ['modle']; valid fields: ["]),
    # -- configuration against the data ---------------------------------------------
    ("batch larger than the data set", _train(batch_size=5), ConfigError,
     ["batch_size=5 is larger than the training set (4 images); use at most 4"]),
    ("delta = 1/N", _train(**DP, delta=0.25), ConfigError,
     ["delta=0.25 must be < 1/N = 0.25 (N = 4 training images)"]),
    ("init_from a run that does not exist", _train(init_from="ghost"), StoreError,
     ["{tmp}/runs/ghost/config.json: no such run (missing config.json)"]),
    # -- the run store -----------------------------------------------------------------
    ("corrupt config.json", _store("config.json", b'{"config": {"model": "un',
                                   lambda s: s.read_meta("r1")), StoreError,
     ["{run}/config.json: corrupt JSON (", "the run cannot be read"]),
    ("config.json of something else", _store("config.json", b"[1, 2]",
                                             lambda s: s.read_meta("r1")), StoreError,
     ["{run}/config.json: missing the 'config' object; not a dpstudy run"]),
    ("history.csv not text", _store("history.csv", b"\x00\xff\xfe\x00 garbage",
                                    lambda s: s.read_history("r1")), StoreError,
     ["{run}/history.csv: corrupt history (", "can't decode"]),
    ("history.csv ragged", _store("history.csv", b"epoch,loss\n1,2\n3,4,5,6,7\n",
                                  lambda s: s.read_history("r1")), StoreError,
     ["{run}/history.csv: corrupt history (Error tokenizing data"]),
    ("history.csv without epochs", _store("history.csv", b"loss\n0.5\n",
                                          lambda s: s.read_history("r1")), StoreError,
     ["{run}/history.csv: corrupt history (no 'epoch' column)"]),
    ("empty history.csv", _store("history.csv", b"", lambda s: s.read_history("r1")),
     StoreError, ["{run}/history.csv: corrupt history (No columns to parse"]),
    ("checkpoint of another model",
     lambda c: load_weights(c.store, "r1", build_model("nested_unet", 8, 2)), StoreError,
     ["{run}/model.pt: checkpoint of a unet (base_width 8, depth 2) does not fit NestedUNet"]),
    ("checkpoint of another width",
     lambda c: load_weights(c.store, "r1", build_model("unet", 16, 2)), StoreError,
     ["{run}/model.pt: checkpoint of a unet (base_width 8, depth 2) does not fit UNet"]),
    ("truncated checkpoint", _store("model.pt", b"PK\x03\x04 truncated",
                                    lambda s: load_checkpoint(s, "r1")), StoreError,
     ["{run}/model.pt: cannot load checkpoint ("]),
    ("corrupt predictions.h5", _store("predictions.h5", b"not hdf5",
                                      lambda s: read_predictions(s, "r1")), StoreError,
     ["{run}/predictions.h5: corrupt predictions file ("]),
    ("run without a checkpoint",
     lambda c: (c.store.path("r1").joinpath("model.pt").unlink(), load_checkpoint(c.store, "r1")),
     StoreError, ["{run}/model.pt: run r1 has no checkpoint (status: completed)"]),
]


@pytest.mark.parametrize("action,error,fragments",
                         [pytest.param(*case[1:], id=case[0]) for case in CASES])
def test_bad_input_gets_an_error_naming_the_fault_and_what_is_valid(tmp_path, action, error,
                                                                    fragments):
    c = Ctx(tmp_path)
    with pytest.raises(error) as info:
        action(c)
    message = str(info.value)
    assert "\n" not in message.strip()
    for fragment in fragments:
        assert fragment.format(tmp=c.tmp, root=c.root, run=c.run) in message


def test_listing_reports_broken_runs_and_lists_the_rest(tmp_path, capsys):
    write_run(tmp_path, "good")
    write_run(tmp_path, "bad-json").joinpath("config.json").write_text("{not json")
    write_run(tmp_path, "bad-history").joinpath("history.csv").write_bytes(b"\xff\xfe\x00")
    write_run(tmp_path, "not-a-run").joinpath("config.json").write_text('"just a string"')
    (tmp_path / "no-config").mkdir()                     # a directory the trainer just made
    (tmp_path / ".hidden").mkdir()
    (tmp_path / "stray-file.txt").write_text("x")
    runs = RunStore(tmp_path).list_runs().set_index("run_id")
    assert sorted(runs.index) == ["bad-history", "bad-json", "good", "not-a-run"]
    assert runs.loc["good", "status"] == "completed" and runs.loc["good", "model"] == "unet"
    for run_id, file in [("bad-json", "config.json"), ("bad-history", "history.csv"),
                         ("not-a-run", "config.json")]:
        assert runs.loc[run_id, "status"] == "broken"
        assert str(tmp_path / run_id / file) in runs.loc[run_id, "error"]
    rc, out, err = main(capsys, "runs", "--runs-dir", str(tmp_path))
    assert rc == 0 and err == ""
    assert [line.split()[:2] for line in out.splitlines()[1:]] == [
        ["bad-history", "broken"], ["bad-json", "broken"], ["good", "completed"],
        ["not-a-run", "broken"]]


def test_cli_errors_are_one_line_and_debug_shows_the_traceback(tmp_path, capsys):
    root = make_duke(tmp_path / "duke")
    np.save(root / MSK, np.full((40, 36), np.nan, np.float32))
    args = ["train", "--data", str(root), "--image-size", "32", "32", "--base-width", "8",
            "--depth", "2", "--batch-size", "2", "--quiet", "--runs-dir", str(tmp_path / "runs")]
    r = cli(*args)                                       # a real process, as a user runs it
    assert_one_line_error(r.returncode, r.stderr, f"{root / MSK}: labels contain NaN")
    r = cli("--debug", *args)
    assert r.returncode != 0 and "Traceback" in r.stderr and "DataError" in r.stderr
    assert not (tmp_path / "runs").exists()              # nothing written for bad data
    for bad, fragment in [
        (["--method", "dp_sgd", "--noise-multiplier", "0"], "noise_multiplier=0.0 must be a"),
        (["--method", "auto_clip", "--target-epsilon", "-1"], "target_epsilon=-1.0 must be a"),
        (["--max-grad-norm", "-1"], "max_grad_norm=-1.0 must be a finite number > 0"),
        (["--image-size", "30", "30"], "30 is not divisible by 4"),
        (["--batch-size", "9"], "batch_size=9 is larger than the training set (4 images)"),
    ]:
        rc, _, err = main(capsys, "train", *TINY_ARGS, "--quiet", *bad, "--runs-dir",
                          str(tmp_path / "runs"))
        assert_one_line_error(rc, err, fragment)
    src = tmp_path / "mat"
    src.mkdir()
    scipy.io.savemat(src / "Subject_01.mat", {"images": np.zeros((4, 4, 1), np.uint8)})
    rc, _, err = main(capsys, "prepare-duke", str(src), str(tmp_path / "out"), "--split",
                      "train=1")
    assert_one_line_error(rc, err, f"{src / 'Subject_01.mat'} has no field 'manualLayers1'")
    rc, _, err = main(capsys, "prepare-duke", str(src), str(tmp_path / "out"), "--split",
                      "train=one")
    assert_one_line_error(rc, err, "--split 'train=one': expected NAME=SUBJECTS like train=1-6")


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
def test_a_failing_run_never_destroys_an_earlier_completed_run(tmp_path, monkeypatch):
    store = RunStore(tmp_path / "runs")
    root = make_duke(tmp_path / "duke")
    cfg = RunConfig(**{**TINY, "data": str(root), "limit": None})
    done = train(cfg, store.root, progress=False, log=quiet)
    before = snapshot(done)
    assert json.loads(before["config.json"])["status"] == "completed"
    assert {"history.csv", "model.pt", "predictions.h5"} <= set(before)

    # the same run again on data that went bad: refused before anything is written
    good_mask = (root / MSK).read_bytes()
    np.save(root / MSK, np.full((40, 36), 11, np.uint8))
    with pytest.raises(DataError, match="labels \\[11\\] are out of range"):
        train(cfg, store.root, progress=False, log=quiet)
    assert snapshot(done) == before
    (root / MSK).write_bytes(good_mask)

    # another run that starts from it with weights that do not fit
    with pytest.raises(StoreError, match="does not fit NestedUNet"):
        train(cfg.replace(model="nested_unet", init_from=done.name), store.root,
              progress=False, log=quiet)
    # another run that fails half-way: recorded as failed, with its error
    monkeypatch.setattr(dpstudy.train, "evaluate", _disk_full)
    other = cfg.replace(seed=1)
    with pytest.raises(OSError, match="No space left"):
        train(other, store.root, progress=False, log=quiet)
    assert snapshot(done) == before
    failed = store.read_meta(other.run_id())
    assert failed["status"] == "failed" and failed["error"] == "OSError: No space left on device"
    assert store.run_ids() == sorted([done.name, other.run_id()])   # the refused ones: nothing
    assert store.read_meta(done.name)["status"] == "completed"


def _disk_full(*_args, **_kwargs):
    raise OSError("No space left on device")
