"""One DP optimizer for every private method, built on Opacus's ``DPOptimizer``.

The three private methods differ only in

* the per-sample clip factor (``abadi``: min(1, C/‖g‖); ``automatic``: R/(‖g‖+γ)),
* whether the clip is taken over the whole gradient (flat) or per parameter tensor,
* whether a random mask zeroes coordinates of every per-sample gradient *before* its
  norm is taken (Random Sparsification), and of the noise.

Clipping acts on privacy units, not on rows of the batch. A unit's rows are adjacent:
with augmentation multiplicity K (De et al. 2022) the K augmented copies of a sample;
with ``privacy_unit=subject`` the copies of all B-scans of one subject (McMahan et al.
2018). The unit's gradient is the sum over its samples of the mean over each sample's
copies, and it is clipped once, so the sensitivity per unit is C whatever its size.

Everything else — gradient accumulation across physical batches, noise generation,
division by the expected batch size, the accountant's step hook — is Opacus's.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from opacus.optimizers.optimizer import (
    DPOptimizer,
    _check_processed_flag,
    _generate_noise,
    _mark_as_processed,
)

from .canaries import GradientCanaries
from .clipping import clip_factor
from .sparsification import Sparsifier


class StudyDPOptimizer(DPOptimizer):
    """DPOptimizer with pluggable clip function, per-layer bounds and sparsification.

    ``max_grad_norm`` is the sensitivity of the summed update: C for flat clipping; for
    per-layer clipping every parameter tensor gets bound C/√L, so the total is C again.
    """

    def __init__(self, optimizer, *, noise_multiplier: float, max_grad_norm: float,
                 expected_batch_size: int, clip_fn: str = "abadi", gamma: float = 0.01,
                 per_layer: bool = False, sparsifier: Sparsifier | None = None,
                 aug_multiplicity: int = 1,
                 unit_sizes: Callable[[], Sequence[int]] | None = None, **kwargs):
        super().__init__(optimizer, noise_multiplier=noise_multiplier,
                         max_grad_norm=max_grad_norm,
                         expected_batch_size=expected_batch_size, **kwargs)
        self.clip_fn = clip_fn
        self.gamma = gamma
        self.per_layer = per_layer
        self.sparsifier = sparsifier
        self.aug_multiplicity = aug_multiplicity
        self.unit_sizes = unit_sizes    # samples per unit of the current batch; None: 1 each
        # every one of the L parameter tensors gets the same bound, C/√L
        self.block_bound = max_grad_norm / math.sqrt(len(self.params))
        self.norm_log: list[torch.Tensor] = []      # per-unit total norms (pre-clip)
        self.clipped_log: list[torch.Tensor] = []   # per-unit: was any block scaled down
        self.canaries: GradientCanaries | None = None   # white-box audit, set by the method

    @property
    def _masks(self) -> list[torch.Tensor] | None:
        return self.sparsifier.masks if self.sparsifier is not None else None

    def _unit_rows(self, rows: int) -> torch.Tensor:
        """Rows of the batch that make up each unit, in order."""
        k = self.aug_multiplicity
        if self.unit_sizes is None:
            return torch.full((rows // k,), k)
        sizes = torch.tensor(list(self.unit_sizes()), dtype=torch.long) * k
        if int(sizes.sum()) != rows:
            raise RuntimeError(f"the batch has {rows} per-sample gradients but its units "
                               f"account for {int(sizes.sum())}: units and batch out of step")
        return sizes

    def clip_and_accumulate(self):
        for p in self.params:
            _check_processed_flag(p.grad_sample)
        masks = self._masks
        grads = [self._get_flat_grad_sample(p).to(p.dtype) for p in self.params]
        sizes = self._unit_rows(len(grads[0]))
        if bool((sizes != 1).any()):
            unit = torch.repeat_interleave(torch.arange(len(sizes)), sizes).to(grads[0].device)
            grads = [g.new_zeros(len(sizes), *g.shape[1:]).index_add_(0, unit, g)
                     / self.aug_multiplicity for g in grads]
        if masks is not None:
            grads = [g * m.to(g) for g, m in zip(grads, masks)]
        block_norms = torch.stack([g.flatten(1).norm(2, dim=-1) for g in grads], dim=1)
        factors = self.clip_factors(block_norms)
        for i, (p, g) in enumerate(zip(self.params, grads)):
            summed = torch.einsum("i,i...", factors[:, i], g)
            p.summed_grad = summed if p.summed_grad is None else p.summed_grad + summed
            _mark_as_processed(p.grad_sample)

    def clip_factors(self, block_norms: torch.Tensor) -> torch.Tensor:
        """[B, L] clip factors from [B, L] per-sample norms of the L parameter tensors
        (flat: one factor per sample from the total norm); logs the norms and clipping."""
        total = block_norms.norm(2, dim=1)
        if self.per_layer:
            factors = clip_factor(self.clip_fn, block_norms, self.block_bound, self.gamma)
        else:
            factors = clip_factor(self.clip_fn, total, self.max_grad_norm, self.gamma)
            factors = factors[:, None].expand_as(block_norms)
        self.norm_log.append(total.detach())
        self.clipped_log.append((factors < 1.0).any(dim=1).detach())
        return factors

    def add_noise(self):
        masks = self._masks
        if self.canaries is not None:   # through the same masks and clip function
            bound = self.block_bound if self.per_layer else self.max_grad_norm
            self.canaries.add_to([p.summed_grad for p in self.params], self.canaries.clipped(
                self.canaries.values(self.canaries.draw(), masks), self.clip_fn, bound,
                self.gamma))
        for i, p in enumerate(self.params):
            _check_processed_flag(p.summed_grad)
            noise = _generate_noise(std=self.noise_multiplier * self.max_grad_norm,
                                    reference=p.summed_grad, generator=self.generator,
                                    secure_mode=self.secure_mode)
            if masks is not None:
                noise = noise * masks[i].to(noise)
            p.grad = (p.summed_grad + noise).view_as(p)
            _mark_as_processed(p.summed_grad)
        if self.canaries is not None:
            self.canaries.observe([p.grad for p in self.params])

    def pop_grad_stats(self) -> dict[str, float]:
        """Median per-unit gradient norm and fraction clipped since the last call.

        Diagnostics computed from private gradients without noise: not covered by ε.
        Automatic Clipping rescales every sample, so "clipped" has no meaning there (NaN).
        """
        norms = torch.cat(self.norm_log) if self.norm_log else torch.empty(0)
        clipped = torch.cat(self.clipped_log) if self.clipped_log else torch.empty(0)
        self.norm_log, self.clipped_log = [], []
        if norms.numel() == 0:
            return {"grad_norm_median": float("nan"), "clipped_fraction": float("nan")}
        # the usual median (mean of the two middle values of an even count), as numpy and
        # pandas give it; torch.median returns the lower of the two
        return {"grad_norm_median": float(norms.double().quantile(0.5)),
                "clipped_fraction": (float("nan") if self.clip_fn == "automatic"
                                     else float(clipped.float().mean()))}
