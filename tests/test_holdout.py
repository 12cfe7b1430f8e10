"""Audit hold-out: non-members drawn from the training subjects themselves."""

import dataclasses
import hashlib
import json

import numpy as np
import pytest

from dpstudy.audit import audit_run
from dpstudy.config import HASH_EXCLUDED, HASH_NEUTRAL_DEFAULTS, RunConfig
from dpstudy.data.duke import load_split
from dpstudy.data.holdout import split_holdout, subject_of
from dpstudy.data.sample import Sample
from dpstudy.errors import ConfigError, DataError
from dpstudy.store import RunStore
from dpstudy.train import train

TINY = dict(data="synthetic", limit=12, image_size=(32, 32), base_width=8, depth=2, epochs=1,
            batch_size=2)


def _samples(counts: dict[str, int]) -> list[Sample]:
    z = np.zeros((4, 4), np.uint8)
    return [Sample(f"{subject}_{i:02d}", z, z) for subject, n in counts.items() for i in range(n)]


def test_every_subject_gives_its_share_and_keeps_members():
    samples = _samples({"Subject_01": 11, "Subject_02": 11, "Subject_03": 2})
    members, held = split_holdout(samples, 0.5)
    names = lambda xs: [s.name for s in xs]   # noqa: E731
    assert sorted(names(members) + names(held)) == sorted(names(samples))
    assert not set(names(members)) & set(names(held))
    per_subject = {s: sum(subject_of(x.name) == s for x in held)
                   for s in ("Subject_01", "Subject_02", "Subject_03")}
    assert per_subject == {"Subject_01": 5, "Subject_02": 5, "Subject_03": 1}
    assert {subject_of(s.name) for s in members} == set(per_subject)
    assert names(split_holdout(samples, 0.5)[1]) == names(held)            # fixed draw
    assert names(split_holdout(samples, 0.5, seed=7)[1]) != names(held)
    assert split_holdout(samples, 0.0) == (samples, [])


def test_holdout_errors_name_the_value_or_subject():
    with pytest.raises(DataError, match="audit_holdout=1.0"):
        split_holdout(_samples({"S_01": 3}), 1.0)
    with pytest.raises(DataError, match="subject Subject_02 has 1"):
        split_holdout(_samples({"Subject_01": 3, "Subject_02": 1}), 0.5)
    with pytest.raises(ConfigError, match="audit_holdout=-0.1"):
        RunConfig(audit_holdout=-0.1)


def test_holdout_on_real_duke_covers_all_six_training_subjects(duke_root):
    members, held = split_holdout(load_split(duke_root, "train"), 0.5)
    assert len(members) == 36 and len(held) == 30   # 5 of 11 per subject held out
    assert ({subject_of(s.name) for s in held} == {subject_of(s.name) for s in members}
            == {f"Subject_0{i}" for i in range(1, 7)})


def test_default_holdout_leaves_stored_run_ids_unchanged():
    """A config at the values every later field reproduces hashes as it did before
    those fields existed; the fields count once set otherwise."""
    cfg = RunConfig.from_stored(RunConfig(method="dp_sgd", noise_multiplier=1.0).to_dict()
                                | HASH_NEUTRAL_DEFAULTS)
    before = {k: v for k, v in cfg.to_dict().items()
              if k not in HASH_NEUTRAL_DEFAULTS and k not in HASH_EXCLUDED}
    blob = json.dumps(before, sort_keys=True, separators=(",", ":"))
    assert cfg.config_hash() == hashlib.sha256(blob.encode()).hexdigest()[:8]
    assert dataclasses.replace(cfg, audit_holdout=0.5).run_id() != cfg.run_id()
    assert dataclasses.replace(cfg, normalisation="per_image").run_id() != cfg.run_id()
    assert dataclasses.replace(cfg, randomness="os_entropy").run_id() == cfg.run_id()


@pytest.mark.slow
def test_run_trains_on_members_only_and_audits_against_its_holdout(tmp_path):
    cfg = RunConfig(method="dp_sgd", noise_multiplier=1.0, audit_holdout=0.5, **TINY)
    train(cfg, tmp_path, progress=False, log=lambda *_: None)
    meta = RunStore(tmp_path).read_meta(cfg.run_id())
    assert meta["data"]["n_train"] == 6 and meta["data"]["n_audit_holdout"] == 6
    assert meta["sample_rate"] == pytest.approx(2 / 6)     # q follows the members
    result = audit_run(tmp_path, cfg.run_id(), n_boot=50)
    assert result["nonmember_split"] == "train hold-out" and result["same_subjects"] is True
    assert result["n_members"] == result["n_nonmembers"] == 6
    assert result["reference"] == "random initialisation (seed 0)"
    assert 0 <= result["reference_auc"] <= 1
    assert audit_run(tmp_path, cfg.run_id(), n_boot=10)["reference_auc"] == result["reference_auc"]
    plain = RunConfig(method="dp_sgd", noise_multiplier=1.0, **TINY)
    train(plain, tmp_path, progress=False, log=lambda *_: None)
    assert audit_run(tmp_path, plain.run_id(), n_boot=50)["nonmember_split"] == "test"
    runs = RunStore(tmp_path).list_runs().set_index("run_id")
    assert runs.loc[cfg.run_id(), "mia_same_subjects"] == True   # noqa: E712
    assert runs.loc[plain.run_id(), "audit_holdout"] == 0.0
