"""Membership-inference audit: the statistics on scores with known answers, then the
audit of a real (tiny) run and how it is stored."""

import itertools
import json

import numpy as np
import pytest
from _runs import main

from dpstudy.audit import (attack_statistics, audit_run, balance, bootstrap_ci, roc_auc,
                           runs_to_audit, tpr_at_fpr)
from dpstudy.config import RunConfig
from dpstudy.errors import DataError, StoreError
from dpstudy.store import RunLock, RunStore
from dpstudy.train import train

TINY = dict(data="synthetic", limit=6, image_size=(32, 32), base_width=8, depth=2, epochs=1,
            batch_size=2)


def brute_force_auc(m, n):
    return np.mean([1.0 if a > b else 0.5 if a == b else 0.0 for a, b in itertools.product(m, n)])


def test_auc_known_values_and_ties():
    assert roc_auc([3, 4, 5], [0, 1, 2]) == 1.0
    assert roc_auc([0, 1, 2], [3, 4, 5]) == 0.0
    assert roc_auc([1, 1], [1, 1, 1]) == 0.5
    rng = np.random.default_rng(1)
    m, n = rng.integers(0, 5, 30), rng.integers(0, 4, 17)      # many ties
    assert roc_auc(m, n) == pytest.approx(brute_force_auc(m, n))


def test_tpr_at_fpr_picks_the_best_threshold_within_the_budget():
    nonmembers = np.arange(10.0)                  # FPR moves in steps of 0.1
    members = [20.0, 9.5, 8.5, 0.5]
    assert tpr_at_fpr(members, nonmembers, 0.1) == 0.75   # threshold 8: one non-member (9) above
    assert tpr_at_fpr(members, nonmembers, 0.0) == 0.5    # threshold 9: no non-member above
    assert tpr_at_fpr(members, nonmembers, 0.19) == 0.75  # 1.9 false positives allowed = 1
    assert tpr_at_fpr([1.0] * 5, [1.0] * 10, 0.1) == 0.0  # ties are never flagged


def test_identical_distributions_give_chance_within_the_interval():
    rng = np.random.default_rng(0)
    m, n = rng.normal(size=300), rng.normal(size=300)
    auc = roc_auc(m, n)
    lo, hi = bootstrap_ci(m, n, roc_auc, n_boot=300)
    assert lo < 0.5 < hi and lo < auc < hi and hi - lo < 0.15
    lo, hi = bootstrap_ci(m, n, lambda a, b: tpr_at_fpr(a, b, 0.1), n_boot=300)
    assert lo <= 0.1 <= hi


def test_separated_distributions_give_an_auc_near_one():
    rng = np.random.default_rng(0)
    m, n = rng.normal(6, 1, size=100), rng.normal(0, 1, size=100)
    assert roc_auc(m, n) > 0.99
    assert bootstrap_ci(m, n, roc_auc, n_boot=200)[0] > 0.98
    assert tpr_at_fpr(m, n, 0.01) > 0.95


def test_balance_subsamples_the_larger_set_reproducibly():
    a, b = balance(np.arange(66.0), np.arange(100.0, 122.0))
    assert len(a) == len(b) == 22 and set(a) <= set(range(66)) and len(set(a)) == 22
    assert np.array_equal(a, balance(np.arange(66.0), np.arange(22.0))[0])
    assert np.array_equal(b, np.arange(100.0, 122.0))


def test_attack_reports_tpr_only_where_the_sample_resolves_the_rate():
    rng = np.random.default_rng(0)
    small = attack_statistics(rng.normal(size=66), rng.normal(size=22), n_boot=50)
    assert small["n_members"] == small["n_nonmembers"] == 22
    assert set(small["tpr_at_fpr"]) == {"0.1"}
    large = attack_statistics(rng.normal(size=150), rng.normal(size=120), n_boot=50)
    assert set(large["tpr_at_fpr"]) == {"0.1", "0.01"}
    # low loss = member: members with smaller losses must give an AUC above 0.5
    assert attack_statistics(rng.normal(0, 1, 50), rng.normal(3, 1, 50), n_boot=50)["auc"] > 0.9


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("store")
    cfg = RunConfig(method="dp_sgd", noise_multiplier=1.0, **TINY)
    train(cfg, root, progress=False, log=lambda *_: None)
    return root, cfg.run_id()


@pytest.mark.slow
def test_audit_is_stored_in_the_run_without_touching_anything_else(run):
    root, run_id = run
    path = root / run_id / "config.json"
    before = json.loads(path.read_text())
    result = audit_run(root, run_id, n_boot=100)
    after = json.loads(path.read_text())
    assert after.pop("audit") == json.loads(json.dumps(result))
    before.pop("audit", None)
    assert after == before
    assert result["member_split"] == "train" and result["nonmember_split"] == "test"
    assert result["n_members"] == result["n_nonmembers"] == 6
    assert result["auc_ci"][0] <= result["auc"] <= result["auc_ci"][1]
    assert RunStore(root).list_runs().set_index("run_id").loc[run_id, "mia_auc"] == result["auc"]


@pytest.mark.slow
def test_audit_refuses_locked_unfinished_or_changed_runs(run, tmp_path):
    root, run_id = run
    lock = RunLock(root / run_id).acquire()
    try:
        with pytest.raises(StoreError, match="another process"):
            audit_run(root, run_id, n_boot=10)
    finally:
        lock.release()
    copy = tmp_path / run_id
    copy.mkdir()
    for f in (root / run_id).iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    meta = json.loads((copy / "config.json").read_text())
    changed = {**meta, "data": {**meta["data"], "fingerprint": "x"}}
    (copy / "config.json").write_text(json.dumps(changed))
    with pytest.raises(DataError, match="fingerprint"):
        audit_run(tmp_path, run_id, n_boot=10)
    (copy / "config.json").write_text(json.dumps({**meta, "status": "failed"}))
    with pytest.raises(StoreError, match="only completed runs"):
        audit_run(tmp_path, run_id, n_boot=10)
    assert runs_to_audit(tmp_path) == []


@pytest.mark.slow
def test_cli_audits_all_pending_runs_once(run, capsys):
    root, run_id = run
    rc, out, err = main(capsys, "audit", "--all", "--force", "--runs-dir", str(root))
    assert rc == 0, err
    assert out.startswith(run_id) and "AUC" in out
    assert runs_to_audit(root) == []
    rc, out, _ = main(capsys, "audit", "--all", "--runs-dir", str(root))
    assert rc == 0 and out == ""
    rc, _, err = main(capsys, "audit", "nope", "--runs-dir", str(root))
    assert rc == 2 and "nope" in err
