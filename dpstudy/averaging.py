"""Exponential moving average of the weights (De et al. 2022, for DP image models).

Averaging the iterates is post-processing of the noised updates, so it is free in
privacy; it smooths the noise that DP adds to every step. The average is what the run
evaluates and saves when ``ema_decay > 0``.
"""

import copy

import torch
from torch import nn


class WeightAverage:
    """``avg ← decay·avg + (1 − decay)·w`` after every optimizer step, from the start weights."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.model = copy.deepcopy(model).requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        for avg, w in zip(self.model.parameters(), model.parameters()):
            avg.lerp_(w.detach(), 1.0 - self.decay)
