"""White-box gradient canaries for the one-run audit (:mod:`.one_run_audit`).

Each of m canaries is a Dirac gradient: norm C on one coordinate of the parameters (a
distinct coordinate per canary), included in the run with probability ½. An included
canary joins every logical step with the run's sampling rate q, exactly like a training
unit: it is masked by Random Sparsification's current mask, clipped by the method's
clip function and summed before the noise, so it meets the mechanism that real
gradients meet. The auditor then reads the noised update at each canary's coordinate and
sums it over the steps (the strongest, white-box setting: it sees every update). With
the noise the accountant assumes, included and excluded canaries are hard to tell apart;
with less noise, or a mask that removes them, the bound says so.

Canaries change the run (they are extra gradients), so ``audit_canaries`` is part of the
run's identity: an audited run is an audit run, not a result run.
"""

from __future__ import annotations

import torch

from .clipping import clip_factor


class GradientCanaries:
    def __init__(self, shapes: list[torch.Size], m: int, norm: float, sample_rate: float,
                 seed: int):
        sizes = torch.tensor([s.numel() for s in shapes])
        total = int(sizes.sum())
        if m > total:
            raise ValueError(f"{m} canaries need as many parameters; the model has {total}")
        self.generator = torch.Generator().manual_seed(seed)
        flat = torch.randperm(total, generator=self.generator)[:m]
        offsets = torch.cumsum(sizes, 0) - sizes
        self.param = torch.searchsorted(torch.cumsum(sizes, 0), flat, right=True)
        self.local = flat - offsets[self.param]
        self.included = torch.rand(m, generator=self.generator) < 0.5
        # per parameter tensor: which canaries sit on it and their coordinates as a
        # multi-index, computed once (gradients may be channels-last, where a flat view of
        # memory is not the logical order)
        self.sites = [(sel, torch.unravel_index(self.local[sel], shape))
                      for sel, shape in ((self.param == i, shape)
                                         for i, shape in enumerate(shapes))]
        self.norm, self.sample_rate = float(norm), float(sample_rate)
        self.scores = torch.zeros(m, dtype=torch.float64)
        self.steps = 0

    def draw(self) -> torch.Tensor:
        """Canaries in this logical step: included ones, each Poisson-sampled at q."""
        return self.included & (torch.rand(len(self.included), generator=self.generator)
                                < self.sample_rate)

    def values(self, present: torch.Tensor, masks=None) -> torch.Tensor:
        """Each canary's gradient value this step: C if present, 0 if not, and 0 where
        Random Sparsification's current ``masks`` drop its coordinate."""
        values = torch.where(present, self.norm, 0.0).double()
        if masks is not None:
            for (sel, where), mask in zip(self.sites, masks):
                values[sel] *= mask[_on(where, mask)].double().cpu()
        return values

    def clipped(self, values: torch.Tensor, clip_fn: str, bound: float, gamma: float
                ) -> torch.Tensor:
        """The values times their clip factors: a Dirac gradient's norm is its one value,
        over the whole gradient or its block alike (``bound``: C flat, C/√L per layer)."""
        return values * clip_factor(clip_fn, values, bound, gamma)

    def add_to(self, grads: list[torch.Tensor], contributions: torch.Tensor) -> None:
        """Add per-canary values into the matching gradient tensors."""
        for (sel, where), g in zip(self.sites, grads):
            g.index_put_(_on(where, g), contributions[sel].to(g), accumulate=True)

    def observe(self, grads: list[torch.Tensor]) -> None:
        """Accumulate the released update at every canary's coordinate (its score)."""
        for (sel, where), g in zip(self.sites, grads):
            self.scores[sel] += g.detach()[_on(where, g)].double().cpu()
        self.steps += 1


def _on(where: tuple[torch.Tensor, ...], t: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """A multi-index on ``t``'s device (a no-op on the CPU)."""
    return tuple(w.to(t.device) for w in where)
