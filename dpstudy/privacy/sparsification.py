"""Random Sparsification (Zhu & Blaschko, TMLR 2023): random coordinate masks.

The mask is drawn from a generator that never sees data, so it costs no privacy; the
accountant is unchanged. The rate follows *gradual cooling*: it rises linearly from 0
at the first mask to ``final_rate`` at the last one.
"""

from __future__ import annotations

import torch


def cooling_rate(final_rate: float, epoch: int, k: int, refresh: int, epochs: int) -> float:
    """Sparsification rate of mask ``k`` (0-based) within ``epoch`` (0-based).

    r = clip(r*·(epoch·refresh + k)/(refresh·epochs − 1), 0, r*), as in the reference
    code. With a single mask in the whole run the denominator is 0; the run is then at
    its final mask from the start, so r = r*.
    """
    total = refresh * epochs - 1
    if total <= 0:
        return float(final_rate)
    r = final_rate * (epoch * refresh + k) / total
    return float(min(max(r, 0.0), final_rate))


def refresh_steps(steps_per_epoch: int, refresh: int) -> list[int]:
    """Step indices within an epoch at which mask k = 0..refresh-1 is drawn."""
    return [(k * steps_per_epoch) // refresh for k in range(refresh)]


def draw_masks(shapes: list[torch.Size], rate: float, generator: torch.Generator) -> list[torch.Tensor]:
    """One 0/1 mask per parameter with exactly round(rate·numel) zeros in each.

    An exact count (random permutation) rather than independent Bernoulli draws makes
    the sparsity the schedule asks for, and is what the tests can check exactly.
    """
    masks = []
    for shape in shapes:
        n = int(torch.Size(shape).numel())
        n_zero = int(round(rate * n))
        flat = torch.ones(n)
        if n_zero:
            flat[torch.randperm(n, generator=generator)[:n_zero]] = 0.0
        masks.append(flat.view(shape))
    return masks


class Sparsifier:
    """Holds the current masks; the DP optimizer multiplies gradients and noise by them.

    Masks are drawn on the CPU (the same masks for a seed on every device) and moved to
    ``device`` once per refresh, not once per step."""

    def __init__(self, shapes: list[torch.Size], final_rate: float, refresh: int, epochs: int,
                 seed: int, device: torch.device | str = "cpu"):
        self.shapes = list(shapes)
        self.final_rate = final_rate
        self.refresh = refresh
        self.epochs = epochs
        self.generator = torch.Generator().manual_seed(seed)
        self.device = torch.device(device)
        self.rate = 0.0
        self.masks: list[torch.Tensor] | None = None

    def maybe_refresh(self, epoch: int, step: int, steps_per_epoch: int) -> None:
        """Draw mask k when ``step`` is its refresh step within the epoch."""
        starts = refresh_steps(steps_per_epoch, self.refresh)
        if step in starts:
            k = starts.index(step)
            self.rate = cooling_rate(self.final_rate, epoch, k, self.refresh, self.epochs)
            self.masks = [m.to(self.device) for m in
                          draw_masks(self.shapes, self.rate, self.generator)]
