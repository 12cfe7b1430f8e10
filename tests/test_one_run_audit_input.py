"""The input-space one-run audit: canary B-scans (public phantom scans with a wrong mask),
each trained on with probability ½, scored on the final model alone."""

import json

import numpy as np
import pytest

from dpstudy import train as train_module
from dpstudy.cli import build_parser
from dpstudy.config import RunConfig
from dpstudy.data import canary_images
from dpstudy.data.canary_images import (CanaryImages, draw_included, is_canary,
                                        make_canaries)
from dpstudy.data.phantom import phantom_splits
from dpstudy.data.source import SYNTHETIC_SEED
from dpstudy.data.units import group_by_unit, unit_of
from dpstudy.errors import ConfigError
from dpstudy.launch_form import fields
from dpstudy.methods import random_seed
from dpstudy.train import _scans_per_subject, train

from _runs import TINY, one_thread, quiet  # noqa: F401  (one_thread is a fixture)


def test_canaries_are_deterministic_a_prefix_and_wrongly_labelled():
    a, b = make_canaries(6, (32, 32)), make_canaries(6, (32, 32))
    assert [s.name for s in a] == [f"canary_{i:04d}" for i in range(6)]
    for x, y in zip(a, b):
        assert np.array_equal(x.image, y.image) and np.array_equal(x.mask, y.mask)
    short = make_canaries(3, (32, 32))
    assert all(np.array_equal(x.image, y.image) for x, y in zip(short, a))
    # the mask is another scan's: not the image's own labels
    from dpstudy.classes import RAW_TO_CLASS
    from dpstudy.data.phantom import phantom_pairs
    own = [RAW_TO_CLASS[raw] for _, raw in phantom_pairs(6, canary_images.IMAGE_SEED, 64, 64)]
    assert all(np.mean(s.mask != m) > 0.05 for s, m in zip(a, own))
    assert all(s.mask.max() <= 8 and s.image.dtype == np.uint8 for s in a)


def test_canary_streams_and_names_never_meet_the_data():
    split_seeds = {3 * SYNTHETIC_SEED + k for k in range(3)}
    assert not {canary_images.IMAGE_SEED, canary_images.MASK_SEED} & split_seeds
    real = [s.name for split in phantom_splits(height=64, width=64, n_train=3, n_val=2,
                                               n_test=2).values() for s in split]
    real += [f"Subject_{i:02d}_{k:02d}" for i in range(1, 11) for k in range(11)]
    assert not any(is_canary(n) for n in real)
    assert all(is_canary(s.name) for s in make_canaries(3, (32, 32)))


def test_each_canary_is_its_own_subject_and_leaves_real_subjects_alone():
    duke = [f"Subject_{i:02d}_{k:02d}" for i in (1, 2) for k in range(3)]
    names = duke + ["canary_0000", "canary_0001"]
    assert unit_of("canary_0001") == "canary_0001"
    assert group_by_unit(names) == [[0, 1, 2], [3, 4, 5], [6], [7]]
    assert _scans_per_subject(names) == _scans_per_subject(duke) == 3


def test_the_inclusion_draw_is_seeded_and_fair():
    assert np.array_equal(draw_included(200, 5), draw_included(200, 5))
    assert not np.array_equal(draw_included(200, 5), draw_included(200, 6))
    assert 0.4 < draw_included(2000, 5).mean() < 0.6
    c = CanaryImages.for_run(8, 5, (32, 32))
    assert [s.name for s in c.members] == [s.name for s, i in zip(c.samples, c.included) if i]
    assert c.record()["included"] == [bool(v) for v in c.included]


def test_the_config_field_flag_and_form_label():
    for bad in (-1, 1.5, True, "3"):
        with pytest.raises(ConfigError, match="audit_canary_images=.*integer ≥ 0"):
            RunConfig(audit_canary_images=bad)
    assert RunConfig(audit_canary_images=0).run_id() == RunConfig().run_id()   # old ids hold
    assert RunConfig(audit_canary_images=40).run_id() != RunConfig().run_id()
    args = build_parser().parse_args(["train", "--audit-canary-images", "40"])
    assert args.audit_canary_images == 40
    assert "canary B-scans" in fields()["audit_canary_images"].label


@pytest.mark.slow
def test_included_canaries_train_and_count_excluded_ones_do_not(tmp_path, monkeypatch,
                                                                one_thread):  # noqa: F811
    seen = []
    real_dataset = train_module.SegmentationDataset

    def recording(samples, *args, **kwargs):
        ds = real_dataset(samples, *args, **kwargs)
        seen.append(ds.names)
        return ds

    monkeypatch.setattr(train_module, "SegmentationDataset", recording)
    cfg = RunConfig(**{**TINY, "method": "dp_sgd", "noise_multiplier": 1.0,
                       "privacy_unit": "subject", "audit_canary_images": 10})
    meta = json.loads((train(cfg, tmp_path, progress=False, log=quiet) / "config.json")
                      .read_text())
    included = draw_included(10, random_seed(cfg, 5))
    assert 0 < included.sum() < 10
    names = [f"canary_{i:04d}" for i in range(10)]
    trained = seen[0]                               # the training set, as built
    assert [n for n in trained if is_canary(n)] == [n for n, i in zip(names, included) if i]
    assert not any(is_canary(n) for n in seen[1])   # val
    k = int(included.sum())
    assert meta["data"]["n_train"] == TINY["limit"] + k == meta["data"]["n_canary_images"] + 4
    assert meta["n_units"] == TINY["limit"] + k     # each canary one subject in the accountant
    audit = meta["one_run_audit_input"]
    assert audit["variant"] == "input-space" and audit["m"] == 10
    assert audit["included"] == included.tolist() and audit["names"] == names
    assert "one_run_audit" not in meta              # the white-box block only with its canaries


#: few real images, many epochs: the canaries' wrong masks are memorised (non-private)
MEMORISE = dict(TINY, limit=1, batch_size=8, epochs=40, audit_canary_images=40)


@pytest.mark.slow
def test_a_non_private_run_memorises_its_canaries_and_a_private_one_passes(
        tmp_path, one_thread):  # noqa: F811
    leaky = json.loads((train(RunConfig(**MEMORISE), tmp_path, progress=False, log=quiet)
                        / "config.json").read_text())["one_run_audit_input"]
    assert leaky["score_mean_included"] > leaky["score_mean_excluded"]
    assert leaky["epsilon_lower_bound"] > 0.3        # 0.55 here (≤ 2.06 possible with m = 40)
    private = json.loads((train(RunConfig(**{**MEMORISE, "epochs": 3, "method": "dp_sgd",
                                             "target_epsilon": 1.0}),
                                tmp_path, progress=False, log=quiet) / "config.json").read_text())
    assert private["one_run_audit_input"]["epsilon_lower_bound"] <= private["epsilon"] <= 1.0
