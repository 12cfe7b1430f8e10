"""Per-sample clip factors: the one place where DP-SGD and Automatic Clipping differ.

Both return a factor per sample (and per block, for per-layer clipping) that multiplies
the per-sample gradient before summation. The sensitivity of the sum is ``bound`` in
both cases, so the Gaussian mechanism and its accounting are shared.
"""

import torch


def abadi_factor(norms: torch.Tensor, bound: float) -> torch.Tensor:
    """min(1, C/‖g‖) (Abadi et al. 2016), exactly: a gradient inside the ball or on its
    surface is left alone (factor 1, so it is not counted as clipped).

    The division happens only where ‖g‖ > C > 0, so it needs no guard; Opacus's
    C/(‖g‖ + 1e-6) scaled gradients exactly at the bound and so counted them clipped.
    """
    return torch.where(norms > bound, bound / norms, torch.ones_like(norms))


def automatic_factor(norms: torch.Tensor, bound: float, gamma: float) -> torch.Tensor:
    """R/(‖g‖+γ) (Bu et al. 2023, AUTO-S; γ=0 is AUTO-V): every gradient is normalised.

    ‖g·R/(‖g‖+γ)‖ < R for every γ ≥ 0, so the sensitivity is R. A zero gradient under
    AUTO-V gets factor 0 (its contribution is zero either way) instead of 0/0.
    """
    denom = norms + gamma
    return torch.where(denom > 0, bound / denom.clamp(min=torch.finfo(norms.dtype).tiny),
                       torch.zeros_like(norms))


def clip_factor(kind: str, norms: torch.Tensor, bound: float, gamma: float) -> torch.Tensor:
    if kind == "abadi":
        return abadi_factor(norms, bound)
    if kind == "automatic":
        return automatic_factor(norms, bound, gamma)
    raise ValueError(f"unknown clip function {kind!r}")
