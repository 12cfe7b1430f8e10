"""Privacy accounting as pure functions of (sample rate, σ, steps, δ).

The training loop reads ε from the Opacus accountant that ``make_private`` attached;
these functions recompute it from what the run store records, so a stored ε can be
checked independently and a target ε turned into a noise multiplier before training.
"""

from __future__ import annotations

from opacus.accountants import create_accountant
from opacus.accountants.utils import get_noise_multiplier

from ..errors import ConfigError


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
