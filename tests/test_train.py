"""Real tiny trainings of every method into a real run store."""

import json

import h5py
import numpy as np
import pandas as pd
import pytest
import torch
from opacus.accountants import RDPAccountant

from dpstudy.classes import CLASS_SLUGS
from dpstudy.config import RunConfig
from dpstudy.data.source import load_data
from dpstudy.errors import ConfigError, StoreError
from dpstudy.evaluate import evaluate, evaluate_run, load_trained, predict, stored_dataset
from dpstudy.models import build_model
from dpstudy.store import RunStore, load_checkpoint, load_weights, read_predictions
from dpstudy.train import train

pytestmark = pytest.mark.slow   # every test here trains real models

TINY = dict(data="synthetic", limit=6, image_size=(32, 32), base_width=8, depth=2,
            epochs=2, batch_size=3)
METHOD_CASES = [
    dict(method="non_dp"),
    dict(method="dp_sgd", noise_multiplier=1.0, max_grad_norm=1.0),
    dict(method="dp_sgd", noise_multiplier=1.0, clipping="per_layer"),
    dict(method="auto_clip", noise_multiplier=1.0),
    dict(method="random_sparsification", noise_multiplier=1.0, final_rate=0.5, refresh=2),
    dict(method="random_sparsification", noise_multiplier=1.0, clip_fn="automatic"),
]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    runs = {}
    for case in METHOD_CASES:
        cfg = RunConfig(model="unet", **TINY, **case)
        runs[cfg.run_id()] = (cfg, train(cfg, root, progress=False, log=lambda *_: None))
    return root, runs


def test_every_method_completes_with_the_documented_files(trained):
    root, runs = trained
    store = RunStore(root)
    for run_id, (cfg, run_dir) in runs.items():
        assert run_dir == root / run_id
        meta = json.loads((run_dir / "config.json").read_text())
        assert meta["status"] == "completed", meta.get("error")
        assert meta["config"] == cfg.to_dict()
        assert meta["data"]["kind"] == "synthetic" and len(meta["data"]["fingerprint"]) == 16
        assert set(meta["versions"]) >= {"torch", "opacus", "numpy", "python"}
        hist = pd.read_csv(run_dir / "history.csv")
        assert list(hist["epoch"]) == [1, 2]
        for col in ["train_loss", "val_loss", "val_dice_fg_mean", "val_dice_all_mean",
                    "val_pixel_accuracy", "epsilon", "epoch_seconds",
                    *(f"val_dice_{s}" for s in CLASS_SLUGS[1:])]:
            assert col in hist.columns
        _assert_checkpoint_is_the_final_model(store, run_id)
        with h5py.File(run_dir / "predictions.h5") as f:
            scans = list(f["val"])
            assert len(scans) == meta["data"]["n_val"] > 0
            g = f["val"][scans[0]]
            assert g["pred"].dtype == np.uint8 and g["pred"].shape == g["mask"].shape
            assert g["pred"][()].max() <= 8


def _assert_checkpoint_is_the_final_model(store: RunStore, run_id: str) -> None:
    """Scored again from its checkpoint, a run gives the validation metrics of its last
    history row and, pixel for pixel, the predictions it stored."""
    meta, cfg, model = load_trained(store, run_id)
    reference = build_model(cfg.model, cfg.base_width, cfg.depth).state_dict()
    state = load_checkpoint(store, run_id)
    assert {k: (v.shape, v.dtype) for k, v in state.items()} == {
        k: (v.shape, v.dtype) for k, v in reference.items()}
    assert any(not torch.equal(state[k], reference[k]) for k in state)   # not a fresh model
    val = stored_dataset(load_data(cfg.data, cfg.limit).splits["val"], cfg, meta)
    again, native = evaluate(model, val, cfg.dice_weight)
    last = store.read_history(run_id).iloc[-1]
    for key in ("val_loss", "val_dice_fg_mean", "val_dice_all_mean", "val_pixel_accuracy"):
        assert again[key] == pytest.approx(last[key], rel=1e-6), key
    stored = read_predictions(store, run_id)
    assert sorted(stored) == sorted(val.names)
    for name, pred in zip(val.names, native):
        assert np.array_equal(stored[name]["pred"], pred), name


def test_recorded_epsilon_matches_an_independent_accountant(trained):
    _, runs = trained
    for cfg, run_dir in runs.values():
        meta = json.loads((run_dir / "config.json").read_text())
        hist = pd.read_csv(run_dir / "history.csv")
        if not cfg.private:
            assert meta["epsilon"] is None and hist["epsilon"].isna().all()
            continue
        # Poisson sampling: sample rate 1/len(loader) = batch/N, steps = epochs/q
        assert meta["sample_rate"] == pytest.approx(cfg.batch_size / meta["data"]["n_train"])
        assert meta["steps"] == cfg.epochs * round(1 / meta["sample_rate"])
        acc = RDPAccountant()
        acc.history = [(meta["noise_multiplier"], meta["sample_rate"], meta["steps"])]
        assert meta["epsilon"] == pytest.approx(acc.get_epsilon(cfg.delta), rel=1e-9)
        assert hist["epsilon"].is_monotonic_increasing
        assert hist["epsilon"].iloc[-1] == pytest.approx(meta["epsilon"])


def test_dp_runs_record_gradient_norms_and_sparsity_schedule(trained):
    _, runs = trained
    for cfg, run_dir in runs.values():
        hist = pd.read_csv(run_dir / "history.csv")
        if cfg.private:
            assert (hist["grad_norm_median"] > 0).all()
            if cfg.effective_clip_fn == "automatic":   # every sample is rescaled: no "clipped"
                assert hist["clipped_fraction"].isna().all()
            else:
                assert hist["clipped_fraction"].between(0, 1).all()
        if cfg.method == "random_sparsification":
            # last mask of each epoch: refresh masks per epoch, cooling 0 -> r*
            k = cfg.refresh
            expected = [min(cfg.final_rate, cfg.final_rate * (e * k + k - 1) / (k * cfg.epochs - 1))
                        for e in range(cfg.epochs)]
            assert np.allclose(hist["sparsity"], expected)


def test_same_config_and_seed_reproduce_the_same_history(tmp_path):
    cfg = RunConfig(method="dp_sgd", noise_multiplier=0.8, **{**TINY, "epochs": 1})
    h = []
    for name in ("a", "b"):
        train(cfg, tmp_path / name, progress=False, log=lambda *_: None)
        h.append(pd.read_csv(tmp_path / name / cfg.run_id() / "history.csv"))
    cols = ["train_loss", "val_loss", "val_dice_fg_mean", "epsilon"]
    pd.testing.assert_frame_equal(h[0][cols], h[1][cols])


def test_target_epsilon_calibrates_the_noise(tmp_path):
    cfg = RunConfig(method="auto_clip", target_epsilon=5.0, **TINY)
    run_dir = train(cfg, tmp_path, progress=False, log=lambda *_: None)
    meta = json.loads((run_dir / "config.json").read_text())
    assert 4.8 <= meta["epsilon"] <= 5.0
    assert meta["noise_multiplier"] > 0


def _dice_by_definition(preds: list[np.ndarray], masks: list[np.ndarray]) -> dict[str, float]:
    """Per class, 2|P∩T|/(|P|+|T|) on each image where the class is predicted or present,
    averaged over those images; the means over the scored classes; pooled accuracy."""
    per_class = {}
    for c, slug in enumerate(CLASS_SLUGS):
        scores = [2 * ((p == c) & (m == c)).sum() / ((p == c).sum() + (m == c).sum())
                  for p, m in zip(preds, masks) if (p == c).any() or (m == c).any()]
        per_class[f"dice_{slug}"] = float(np.mean(scores)) if scores else float("nan")
    values = list(per_class.values())
    return {**per_class, "dice_fg_mean": float(np.nanmean(values[1:])),
            "dice_all_mean": float(np.nanmean(values)),
            "pixel_accuracy": float(sum((p == m).sum() for p, m in zip(preds, masks))
                                    / sum(m.size for m in masks))}


def test_evaluate_run_uses_stored_normalisation_and_any_split(trained):
    """Rescored on its own validation images, a run gives the metrics its last history
    row recorded (so the stored normalisation is the one training used); on the whole
    test split, the Dice of its predictions computed here from the definition."""
    root, runs = trained
    run_id = next(iter(runs))
    store = RunStore(root)
    last = store.read_history(run_id).iloc[-1]
    val = evaluate_run(root, run_id, split="val")
    assert val["n_images"] == store.read_meta(run_id)["data"]["n_val"]
    for key in ("loss", "dice_fg_mean", "dice_all_mean", "pixel_accuracy"):
        assert val[key] == pytest.approx(last[f"val_{key}"], rel=1e-6), key
    m = evaluate_run(root, run_id, split="test", limit=None)
    assert m["split"] == "test" and m["n_images"] == 22  # the whole phantom test split
    meta, cfg, model = load_trained(store, run_id)
    test = stored_dataset(load_data(cfg.data, None).splits["test"], cfg, meta)
    _, native, _ = predict(model, test)
    expected = _dice_by_definition(native, list(test.native_masks))
    assert 0 < expected["dice_fg_mean"] < 1           # partly right: every term matters
    for key, value in expected.items():
        assert m[key] == pytest.approx(value, rel=1e-9, nan_ok=True), key


def test_a_run_with_flip_tta_records_what_rescoring_it_gives(tmp_path):
    """Validation in the training loop predicts as rescoring does (with the run's tta):
    the last history row is what ``evaluate_run`` gives, and not what the plain network
    gives."""
    cfg = RunConfig(**{**TINY, "epochs": 1, "tta": "flip"})
    train(cfg, tmp_path, progress=False, log=lambda *_: None)
    last = RunStore(tmp_path).read_history(cfg.run_id()).iloc[-1]
    assert evaluate_run(tmp_path, cfg.run_id())["loss"] == pytest.approx(last["val_loss"],
                                                                            rel=1e-6)
    meta, _, model = load_trained(RunStore(tmp_path), cfg.run_id())
    plain, _ = evaluate(model, stored_dataset(load_data(cfg.data, cfg.limit).splits["val"],
                                              cfg, meta))
    assert plain["val_loss"] != pytest.approx(last["val_loss"], rel=1e-6)


def test_pretrained_weights_start_a_private_run(trained, tmp_path):
    root, runs = trained
    source = next(r for r, (c, _) in runs.items() if c.method == "non_dp")
    cfg = RunConfig(method="dp_sgd", noise_multiplier=1.0, init_from=source,
                    **{**TINY, "epochs": 1})
    run_dir = train(cfg, root, progress=False, log=lambda *_: None)
    assert json.loads((run_dir / "config.json").read_text())["status"] == "completed"
    with pytest.raises(StoreError, match="does not fit"):
        load_weights(RunStore(root), source, build_model("nested_unet", 8, 2))


@pytest.mark.parametrize("fields,match", [
    (dict(batch_size=50), "batch_size=50 is larger than the training set"),
    (dict(method="dp_sgd", noise_multiplier=1.0, delta=0.5), "must be < 1/N"),
])
def test_data_dependent_config_errors(tmp_path, fields, match):
    cfg = RunConfig(**{**TINY, **fields})
    with pytest.raises(ConfigError, match=match):
        train(cfg, tmp_path, progress=False, log=lambda *_: None)
    assert not any(tmp_path.iterdir())       # nothing written for a rejected config


@pytest.mark.duke
@pytest.mark.parametrize("case", METHOD_CASES[:2] + METHOD_CASES[3:5])
def test_one_epoch_of_each_method_on_real_duke_scans(duke_root, tmp_path, case):
    cfg = RunConfig(model="nested_unet", data=str(duke_root), limit=4, image_size=(64, 64),
                    base_width=8, depth=2, epochs=1, batch_size=2, **case)
    run_dir = train(cfg, tmp_path, progress=False, log=lambda *_: None)
    meta = json.loads((run_dir / "config.json").read_text())
    assert meta["status"] == "completed" and meta["data"]["kind"] == "duke"
    with h5py.File(run_dir / "predictions.h5") as f:
        g = next(iter(f["val"].values()))
        assert g["mask"].shape[0] == 496 and g["pred"].shape == g["mask"].shape
    _assert_checkpoint_is_the_final_model(RunStore(tmp_path), run_dir.name)


def test_augmentation_multiplicity_trains_privately(tmp_path):
    cfg = RunConfig(method="dp_sgd", noise_multiplier=1.0, augment=True, aug_multiplicity=3,
                    **{**TINY, "epochs": 1})
    run_dir = train(cfg, tmp_path, progress=False, log=lambda *_: None)
    meta = json.loads((run_dir / "config.json").read_text())
    assert meta["status"] == "completed"
    # K copies change nothing in the accounting: one sample, one clipped gradient
    assert meta["sample_rate"] == pytest.approx(cfg.batch_size / meta["data"]["n_train"])
    with pytest.raises(ConfigError, match="needs augment=True"):
        RunConfig(aug_multiplicity=2)
