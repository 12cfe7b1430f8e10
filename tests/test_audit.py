"""Membership-inference audit: the statistics on scores with known answers, then the
audit of a real (tiny) run and how it is stored."""

import itertools
import json

import numpy as np
import pytest
from _runs import main

from dpstudy.audit import (audit_run, bootstrap_ci, calibrated_statistics, roc_auc,
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


def test_calibration_separates_memorised_images_from_merely_easy_ones():
    rng = np.random.default_rng(0)
    # non-members are easier (lower loss before and after), members were fitted: the loss
    # threshold points the wrong way, the loss drop finds the members
    ms, ns = rng.normal(2.0, 0.3, 60), rng.normal(1.0, 0.3, 60)
    me, ne = ms - rng.normal(0.8, 0.1, 60), ns - rng.normal(0.1, 0.1, 60)
    out = calibrated_statistics(ms, me, ns, ne, n_boot=200)
    assert out["attack"] == "calibrated-loss"
    assert out["auc"] > 0.99 and roc_auc(-me, -ne) < 0.35   # the plain threshold misses
    assert out["reference_auc"] == roc_auc(-ms, -ns) < 0.05
    assert out["auc_gain"] == pytest.approx(out["auc"] - out["reference_auc"])
    assert out["auc_gain_ci"][0] > 0.8 and out["verdict"] == "leakage detected by this attack"


def test_calibrated_attack_keeps_every_image_and_reports_no_leakage_at_chance():
    rng = np.random.default_rng(1)
    start_m, start_n = rng.normal(1.0, 0.3, 66), rng.normal(1.0, 0.3, 22)
    out = calibrated_statistics(start_m, start_m - 0.2 + rng.normal(0, 0.05, 66),
                                start_n, start_n - 0.2 + rng.normal(0, 0.05, 22), n_boot=200)
    assert (out["n_members"], out["n_nonmembers"]) == (66, 22)        # nothing balanced away
    assert out["auc_ci"][0] <= 0.5 <= out["auc_ci"][1]
    assert out["auc_gain_ci"][0] <= out["auc_gain"] <= out["auc_gain_ci"][1]
    assert out["verdict"] == "no leakage detected by this attack"
    assert set(out["tpr_at_fpr"]) == {"0.1"}          # 22 non-members cannot resolve 1 %


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
