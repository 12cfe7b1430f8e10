"""Privacy accounting as pure functions of (sample rate, σ, steps, δ).

The training loop reads ε from the Opacus accountant that ``make_private`` attached;
these functions recompute it from what the run store records, so a stored ε can be
checked independently and a target ε turned into a noise multiplier before training.
Importing it registers the PLD accountant with Opacus under the name ``pld``, so every
Opacus path that takes an accountant name (``PrivacyEngine``, calibration) accepts it.
"""

from __future__ import annotations

import math

from opacus.accountants import create_accountant, register_accountant
from opacus.accountants.utils import get_noise_multiplier

from ..errors import ConfigError
from .pld import PLDAccountant

register_accountant(PLDAccountant.mechanism(), PLDAccountant, force=True)


def epsilon(sample_rate: float, noise_multiplier: float, steps: int, delta: float,
            accountant: str = "rdp") -> float:
    """ε after ``steps`` Poisson-subsampled Gaussian steps; 0 steps spend nothing."""
    if steps == 0:
        return 0.0
    acc = create_accountant(mechanism=accountant)
    acc.history = [(noise_multiplier, sample_rate, steps)]
    return float(acc.get_epsilon(delta=delta))


def calibrate_noise(target_epsilon: float, sample_rate: float, steps: int, delta: float,
                    accountant: str = "rdp") -> float:
    """Smallest σ (to 0.01 in ε) whose ε after ``steps`` is at most ``target_epsilon``."""
    try:
        return float(get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta,
                                          sample_rate=sample_rate, steps=steps,
                                          accountant=accountant))
    except ValueError as exc:
        raise ConfigError(f"target_epsilon={target_epsilon}: {exc}") from exc


def group_privacy(eps: float, delta: float, k: int) -> tuple[float, float]:
    """What an (ε, δ) guarantee per record implies for any k records together.

    The standard bound (kε, k·e^{(k−1)ε}·δ), from chaining k neighbouring data sets;
    δ is capped at 1, where the guarantee says nothing. Used to state what a B-scan-level
    ε means for a patient who contributes k B-scans.
    """
    if not (isinstance(k, int) and not isinstance(k, bool) and k >= 1):
        raise ConfigError(f"group size k={k!r} must be an integer ≥ 1")
    if not (eps >= 0 and 0 <= delta <= 1):
        raise ConfigError(f"(ε, δ)=({eps!r}, {delta!r}) needs ε ≥ 0 and δ in [0, 1]")
    if delta == 0:
        return k * eps, 0.0
    if (k - 1) * eps + math.log(k * delta) >= 0:   # ≥ 1 (and e^{(k−1)ε} may overflow)
        return k * eps, 1.0
    return k * eps, k * math.exp((k - 1) * eps) * delta
