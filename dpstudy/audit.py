"""Empirical privacy: a calibrated membership-inference audit of a trained run.

ε is an upper bound on what any attacker can learn; the audit measures what one attacker
does learn. A single loss threshold (Yeom et al., 2018) mostly measures which images are
easy; the calibrated attack (Watson et al., 2022; the difficulty calibration of Carlini
et al.'s LiRA in its simplest form) scores each image by how much training lowered its
loss — loss at the starting weights minus loss at the end — so an easy non-member does
not pass for a member. Every member and non-member is kept (AUC needs no balancing).

The baseline is the loss-threshold attack at the starting weights: what the split alone
gives away before the run saw any member. The AUC gain over it comes with a paired
bootstrap interval (both AUCs on the same resample). With a few dozen images per set the
estimates are coarse: an interval that covers chance reads "no leakage detected by this
attack" — not "the model learns nothing". TPR at a false-positive rate is only reported
where the non-member set can resolve that rate (at least 1/FPR non-members).
"""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Callable

import numpy as np
import torch
from scipy.stats import rankdata

from .config import RunConfig
from .data.canary_images import CanaryImages
from .data.dataset import SegmentationDataset
from .data.holdout import split_holdout
from .data.source import load_data
from .device import model_device, place_images, place_model
from .errors import DataError, StoreError
from .losses import per_sample_loss
from .evaluate import load_trained, starting_model, stored_dataset, unwrap
from .privacy import one_run_audit
from .store import CONFIG, RunLock, RunStore, atomic_write_json

FPRS = (0.1, 0.01)
N_BOOTSTRAP = 1000
SEED = 0


def roc_auc(member_scores, nonmember_scores) -> float:
    """P(member score > non-member score) + ½·P(tie): the area under the ROC curve,
    computed from ranks (Mann–Whitney U), so ties are handled exactly."""
    m, n = np.asarray(member_scores, float), np.asarray(nonmember_scores, float)
    if not len(m) or not len(n):
        raise ValueError("roc_auc needs at least one member and one non-member score")
    ranks = rankdata(np.concatenate([m, n]))
    return float((ranks[:len(m)].sum() - len(m) * (len(m) + 1) / 2) / (len(m) * len(n)))


def tpr_at_fpr(member_scores, nonmember_scores, max_fpr: float) -> float:
    """Largest true-positive rate of a threshold ``score > t`` whose false-positive rate
    is at most ``max_fpr`` (the attack as used at a fixed error budget)."""
    m, n = np.asarray(member_scores, float), np.sort(np.asarray(nonmember_scores, float))
    allowed = int(np.floor(max_fpr * len(n) + 1e-9))   # non-members we may flag
    # the threshold sits at the (allowed+1)-th largest non-member score: only scores above
    # it are flagged, so at most `allowed` non-members (fewer with ties) are
    threshold = n[len(n) - allowed - 1] if allowed < len(n) else -np.inf
    return float(np.mean(m > threshold))


def bootstrap_ci(member_scores, nonmember_scores,
                 statistic: Callable[[np.ndarray, np.ndarray], float],
                 n_boot: int = N_BOOTSTRAP, level: float = 0.95,
                 seed: int = SEED) -> tuple[float, float]:
    """Percentile interval of ``statistic`` over resamples of members and non-members,
    each drawn with replacement from its own set (the two sets are independent samples)."""
    m, n = np.asarray(member_scores, float), np.asarray(nonmember_scores, float)
    rng = np.random.default_rng(seed)
    values = [statistic(m[rng.integers(0, len(m), len(m))], n[rng.integers(0, len(n), len(n))])
              for _ in range(n_boot)]
    tail = (1 - level) / 2
    lo, hi = np.quantile(values, [tail, 1 - tail])
    return float(lo), float(hi)


def calibrated_statistics(member_start, member_end, nonmember_start, nonmember_end,
                          n_boot: int = N_BOOTSTRAP, seed: int = SEED) -> dict:
    """The calibrated attack (score = start loss − end loss) against the loss-threshold
    attack at the starting weights (score = −start loss): AUCs, the paired AUC gain with
    its bootstrap interval, TPR at low FPR, and the verdict the interval supports."""
    ms, me = np.asarray(member_start, float), np.asarray(member_end, float)
    ns, ne = np.asarray(nonmember_start, float), np.asarray(nonmember_end, float)
    m, n = ms - me, ns - ne
    rng = np.random.default_rng(seed)
    gains = []
    for _ in range(n_boot):
        i, j = rng.integers(0, len(m), len(m)), rng.integers(0, len(n), len(n))
        gains.append(roc_auc(m[i], n[j]) - roc_auc(-ms[i], -ns[j]))
    auc, reference = roc_auc(m, n), roc_auc(-ms, -ns)
    auc_ci = bootstrap_ci(m, n, roc_auc, n_boot, seed=seed)
    out = {"attack": "calibrated-loss", "auc": auc, "auc_ci": list(auc_ci),
           "reference_auc": reference, "auc_gain": auc - reference,
           "auc_gain_ci": [float(q) for q in np.quantile(gains, [0.025, 0.975])],
           "verdict": ("leakage detected by this attack" if auc_ci[0] > 0.5
                       else "no leakage detected by this attack"),
           "tpr_at_fpr": {}, "tpr_at_fpr_ci": {},
           "n_members": len(m), "n_nonmembers": len(n),
           "member_loss_mean": float(me.mean()), "nonmember_loss_mean": float(ne.mean()),
           "n_bootstrap": n_boot, "seed": seed}
    for fpr in (f for f in FPRS if len(n) * f >= 1):
        out["tpr_at_fpr"][str(fpr)] = tpr_at_fpr(m, n, fpr)
        out["tpr_at_fpr_ci"][str(fpr)] = list(bootstrap_ci(
            m, n, functools.partial(tpr_at_fpr, max_fpr=fpr), n_boot, seed=seed))
    return out


@torch.no_grad()
def sample_losses(model: torch.nn.Module, dataset: SegmentationDataset, dice_weight: float,
                  batch_size: int = 8, fluid_weight: float = 1.0) -> np.ndarray:
    """Per-sample training loss of every image, model in eval mode."""
    model.eval()
    device = model_device(model)
    return torch.cat([per_sample_loss(model(place_images(dataset.x[i:i + batch_size], device)),
                                      dataset.y[i:i + batch_size].to(device), dice_weight,
                                      fluid_weight)
                      for i in range(0, len(dataset), batch_size)]).cpu().numpy()


def run_losses(net: torch.nn.Module, dataset: SegmentationDataset, cfg: RunConfig
               ) -> np.ndarray:
    """Each image's loss under ``net``, as the run's training loss defines it: the one
    loss both the membership attack and the input-space audit score with."""
    return sample_losses(unwrap(net), dataset, cfg.dice_weight, fluid_weight=cfg.fluid_weight)


def canary_image_audit(start: torch.nn.Module, final: torch.nn.Module, canaries: CanaryImages,
                       cfg: RunConfig, stats: tuple[float, float] | None) -> dict:
    """The input-space one-run audit: every canary B-scan, included or not, scored by its
    loss at the starting weights minus its loss at the final weights (only the released
    model is seen), turned into an ε lower bound at the run's δ. ``stats``: the run's
    normalisation, so canaries are scored as they were trained on."""
    data = SegmentationDataset(canaries.samples, cfg.image_size, stats)
    scores = run_losses(start, data, cfg) - run_losses(final, data, cfg)
    inc = canaries.included
    return {"variant": "input-space", **one_run_audit.audit(scores, inc, cfg.delta),
            "score": "loss at the starting weights − loss at the final weights",
            "score_mean_included": float(scores[inc].mean()) if inc.any() else None,
            "score_mean_excluded": float(scores[~inc].mean()) if (~inc).any() else None,
            **canaries.record()}


def audit_run(runs_dir, run_id: str, n_boot: int = N_BOOTSTRAP, seed: int = SEED,
              device: str = "auto") -> dict:
    """Audit a completed run and store the result under ``"audit"`` in its config.json.

    Members are exactly the images the run trained on (same data, same ``limit``, same
    hold-out, checked by fingerprint). Non-members are the run's audit hold-out (B-scans
    of the training subjects, see :mod:`dpstudy.data.holdout`) when it has one, else the
    test split if present, else val — other patients, which ``same_subjects`` flags.
    """
    store = RunStore(runs_dir)
    meta = store.read_meta(run_id)
    if meta.get("status") != "completed":
        raise StoreError(f"run {run_id} is {meta.get('status')}; only completed runs are "
                         f"audited")
    meta, cfg, model = load_trained(store, run_id, meta, device)
    bundle = load_data(meta["data"]["spec"], cfg.limit)
    if bundle.fingerprint != meta["data"]["fingerprint"]:
        raise DataError(f"{bundle.spec}: data fingerprint {bundle.fingerprint} differs from the "
                        f"one run {run_id} trained on ({meta['data']['fingerprint']}); the "
                        f"members cannot be identified")
    if not bundle.splits.get("train"):
        raise DataError(f"{bundle.spec}: the audit needs the train split (has "
                        f"{sorted(bundle.splits)})")
    members, held_out = split_holdout(bundle.splits["train"], cfg.audit_holdout)
    nonmember_split = "train hold-out" if held_out else next(
        (s for s in ("test", "val") if bundle.splits.get(s)), None)
    if nonmember_split is None:
        raise DataError(f"{bundle.spec}: run {run_id} has no audit hold-out, and the data has "
                        f"no test or val split for non-members (has {sorted(bundle.splits)})")
    nonmembers = held_out or bundle.splits[nonmember_split]

    def losses(net, samples):
        return run_losses(net, stored_dataset(samples, cfg, meta), cfg)

    with torch.random.fork_rng():    # the fresh weights of a run seeded like this one
        torch.manual_seed(cfg.seed)
        start = place_model(starting_model(store, cfg), model_device(model))
    result = {"member_split": "train", "nonmember_split": nonmember_split,
              # the phantom's splits are one distribution; Duke's are different patients
              "same_subjects": bool(held_out) or bundle.kind != "duke",
              **calibrated_statistics(losses(start, members), losses(model, members),
                                      losses(start, nonmembers), losses(model, nonmembers),
                                      n_boot, seed),
              "reference": (f"run {cfg.init_from}" if cfg.init_from
                            else f"random initialisation (seed {cfg.seed})"),
              # the members' losses are computed from private training images without
              # noise: an auditor's diagnostic, not a release covered by ε
              "covered_by_epsilon": False,
              "created": time.time()}
    _store_audit(store, run_id, result)
    return result


def runs_to_audit(runs_dir, redo: bool = False) -> list[str]:
    """Completed runs without an audit (all completed runs if ``redo``)."""
    store = RunStore(runs_dir)
    out = []
    for run_id in store.run_ids():
        try:
            meta = store.read_meta(run_id)
        except StoreError:
            continue
        if meta.get("status") == "completed" and (redo or "audit" not in meta):
            out.append(run_id)
    return out


def _store_audit(store: RunStore, run_id: str, result: dict) -> None:
    """Read–modify–write config.json under the run's lock: only ``audit`` changes."""
    run_dir = store.path(run_id)
    lock = RunLock(run_dir).acquire()
    try:
        meta = json.loads((run_dir / CONFIG).read_text())
        meta["audit"] = result
        atomic_write_json(run_dir / CONFIG, meta)
    finally:
        lock.release()
