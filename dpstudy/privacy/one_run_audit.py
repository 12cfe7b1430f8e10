"""An empirical lower bound on ε from one training run (Steinke, Nasr & Jagielski,
"Privacy auditing with one (1) training run", NeurIPS 2023).

m canaries are each included independently with probability ½. After training the
auditor ranks them by a score, guesses "included" for the k highest and "excluded" for
the k lowest, and abstains on the rest. If the mechanism is (ε, δ)-DP with respect to
each canary, the number of correct guesses among r is, up to a δ term, dominated by
Binomial(r, e^ε/(1+e^ε)) (the paper's Theorem 5.2): seeing v correct is then unlikely
for a small ε, and the largest ε rejected at confidence 1 − p is the lower bound.

Pure functions: the bound is tested on simulated Gaussian mechanisms whose ε is known.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import stats

CONFIDENCE = 0.95
#: Guess counts r tried, as fractions of m (k = r/2 guesses at each end of the ranking).
#: Trying several is a multiple test: each is judged at p/len(GUESS_FRACTIONS)
#: (Bonferroni), so the bound reported for the best of them holds at ``CONFIDENCE``.
GUESS_FRACTIONS = (0.02, 0.05, 0.1, 0.2, 0.5, 1.0)


def p_value(m: int, r: int, v: int, eps: float, delta: float) -> float:
    """P[≥ v of r guesses correct] for m canaries under an (ε, δ)-DP null (Theorem 5.2)."""
    if not 0 <= v <= r <= m:
        raise ValueError(f"need 0 ≤ v ≤ r ≤ m, got m={m}, r={r}, v={v}")
    accuracy = 1.0 / (1.0 + math.exp(-eps))     # ε-DP randomised response's
    beta = float(stats.binom.sf(v - 1, r, accuracy))
    # the δ term: max over i of P[v − i ≤ Binomial < v] / i, times 2mδ
    below = np.cumsum(stats.binom.pmf(v - np.arange(1, v + 1), r, accuracy))
    alpha = float(np.max(below / np.arange(1, v + 1))) if v else 0.0
    return min(1.0, beta + alpha * delta * 2 * m)


def epsilon_lower_bound(m: int, r: int, v: int, delta: float, p: float = 1 - CONFIDENCE,
                        tol: float = 1e-4) -> float:
    """Largest ε that v correct of r guesses reject at level p (0 if none is rejected)."""
    if p_value(m, r, v, 0.0, delta) >= p:
        return 0.0
    lo, hi = 0.0, 1.0
    while p_value(m, r, v, hi, delta) < p:
        lo, hi = hi, 2 * hi
    while hi - lo > tol:
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if p_value(m, r, v, mid, delta) < p else (lo, mid)
    return lo


def guess(scores: np.ndarray, k: int) -> np.ndarray:
    """+1 (included) for the k highest scores, −1 for the k lowest, 0 (abstain) else."""
    order = np.argsort(scores, kind="stable")
    out = np.zeros(len(scores), dtype=int)
    if k:
        out[order[-k:]], out[order[:k]] = 1, -1
    return out


def audit(scores, included, delta: float, confidence: float = CONFIDENCE,
          fractions=GUESS_FRACTIONS) -> dict:
    """The best lower bound over the guess counts in ``fractions`` (Bonferroni-corrected)
    from canary ``scores`` (higher: more likely included) and the truth ``included``."""
    scores, included = np.asarray(scores, float), np.asarray(included, bool)
    m = len(scores)
    p = (1 - confidence) / len(fractions)
    best = {"guesses": 0, "correct": 0, "epsilon_lower_bound": 0.0}
    for f in fractions:
        k = max(1, int(f * m) // 2)
        g = guess(scores, k)
        r = int((g != 0).sum())
        v = int(((g == 1) & included).sum() + ((g == -1) & ~included).sum())
        eps = epsilon_lower_bound(m, r, v, delta, p)
        if eps > best["epsilon_lower_bound"] or not best["guesses"]:
            best = {"guesses": r, "correct": v, "epsilon_lower_bound": eps}
    return {"m": m, "n_included": int(included.sum()), **best, "confidence": confidence,
            "delta": delta, "guess_fractions": list(fractions)}
