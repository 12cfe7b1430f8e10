"""Book-keeping per-sample clipping with mixed ghost norms (``grad_sample_mode="ghost_mixed"``).

Opacus's hooks let autograd form every batch weight gradient and then form the
per-sample ones as well, so a private backward pays for the weight gradients twice.
Here (Bu et al., NeurIPS 2022 "mixed ghost clipping" and ICML 2023 "book-keeping"):

* the backward pass of every convolution computes only the gradient of its *input*;
  its weight gradient is never formed by autograd. Each layer keeps its input ``a`` and
  output gradient ``b`` on the parameter (``p.ghost_grad``) instead;
* per-sample gradient norms come either from the materialised per-sample gradient
  (≈ T·d·p multiply-adds per sample for T output positions, d = C_in·k², p = C_out) or
  from the *ghost norm* ‖G_i‖² = ⟨a_i a_iᵀ, b_i b_iᵀ⟩ (≈ T²·(d+p));
* the clipped sum Σ_i c_i G_i of a ghost layer is *one* weight gradient of the output
  gradients scaled by the clip factors c_i — the cost of the non-private weight gradient.

So a ghost layer costs its norms *plus* a weight gradient, where a materialised one
costs the per-sample gradients (as many multiply-adds as that weight gradient) plus
memory-bound passes over B·d·p numbers (norms, weighted sum). Ghost norms pay only
where they are small next to the weight gradient: :func:`ghost_norm_is_cheaper`.
(fastDP's rule, 2T² < d·p, compares *memory*; on a CPU it sends 16×16 U-Net layers to
ghost norms that take 2–3× the time of materialising them.)

GroupNorm affine parameters and convolution biases have per-sample gradients of C
numbers per sample (sums over positions): always materialised, in the backward pass.

Where a per-sample gradient must be changed *before* its norm is taken, ghost norms
cannot apply — Random Sparsification (the mask acts on the weight gradient) and
augmentation multiplicity (a sample's K copies are averaged first) — so every ghost
layer is materialised and :class:`StudyDPOptimizer` clips as in the other modes; the
backward still forms no batch weight gradient. Other layers with trainable parameters
(``Linear``, a convolution with reflect padding, …) get materialised per-sample
gradients from a grad sampler (:class:`_Sampled`: :func:`conv2d_grad_sample` for
convolutions, else Opacus's for the layer type): correct, at the cost of the batch
gradient autograd forms for them too; a type without one is refused when the model is
wrapped.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from opacus.grad_sample import GradSampleModule
from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed
from torch import nn

from ..errors import ConfigError
from .conv_grad_sample import conv2d_grad_sample, pads_in_kernel, per_sample_conv_weight_grad
from .optimizer import StudyDPOptimizer

aten = torch.ops.aten


def ghost_norm_is_cheaper(positions: int, d: int, p: int) -> bool:
    """Ghost norm where its multiply-adds, T²(d+p), are under half the per-sample
    gradient's, T·d·p. Timed per layer on a CPU (batch 8, one thread): at T = 8², d·p =
    1152·256 (ratio 0.31) ghost norm + weighted sum took 13 ms against 14 ms
    materialised (channels-last 15 against 22); at T = 14² (ratio 0.85–0.94) 54–100 ms
    against 31–77 ms; at T = 16² (ratio ≥ 2.1) 2–3× slower."""
    return 2 * positions * (d + p) < d * p


class GhostConvWeight:
    """A convolution weight's per-sample gradients G_i = scale · conv-backward(a_i, b_i),
    kept as the layer's input ``a`` and output gradient ``b`` rather than formed."""

    def __init__(self, layer: nn.Conv2d, x: torch.Tensor, grad_out: torch.Tensor, scale: float):
        self.layer, self.x, self.grad_out, self.scale = layer, x, grad_out, scale

    def norms(self) -> torch.Tensor:
        """‖G_i‖ from the Gram matrices of unfolded inputs and output gradients."""
        layer = self.layer
        a = F.unfold(self.x, layer.kernel_size, layer.dilation, layer.padding, layer.stride)
        b = self.grad_out.flatten(2)                                 # [B, p, T]
        gram_a = torch.bmm(a.transpose(1, 2), a)                     # [B, T, T]
        gram_b = torch.bmm(b.transpose(1, 2), b)
        return (gram_a * gram_b).sum(dim=(1, 2)).clamp(min=0).sqrt() * self.scale

    def weighted_sum(self, factors: torch.Tensor) -> torch.Tensor:
        """Σ_i c_i G_i as one weight gradient of the output gradients scaled by c_i."""
        layer = self.layer
        factors = (factors * self.scale).to(self.grad_out.dtype)
        scaled = self.grad_out * factors.view(-1, 1, 1, 1)
        return aten.convolution_backward(
            scaled, self.x, layer.weight, None, list(layer.stride), list(layer.padding),
            list(layer.dilation), False, [0, 0], layer.groups, [False, True, False])[1]

    def materialise(self) -> torch.Tensor:
        return per_sample_conv_weight_grad(self.layer, self.x, self.grad_out) * self.scale


def _placeholder(p: torch.Tensor, batch: int) -> torch.Tensor:
    """What a ghost layer leaves in ``p.grad_sample``: the shape Opacus counts batches by,
    no memory, and NaN — so code that wrongly reads it as a gradient cannot go unnoticed."""
    return torch.full((), float("nan"), dtype=p.dtype, device=p.device).expand(batch, *p.shape)


def _store(p: nn.Parameter, grad_sample: torch.Tensor, ghost: GhostConvWeight | None = None):
    if getattr(p, "grad_sample", None) is not None:
        raise RuntimeError("ghost_mixed: a second backward pass before the optimizer used the "
                           "first one's per-sample gradients (call optimizer.step() or "
                           "zero_grad() between backward passes)")
    p.grad_sample, p.ghost_grad = grad_sample, ghost


def _per_sample_scale(mean: bool, batch: int) -> float:
    """Per-sample gradients are of each sample's own loss: a batch-mean loss scaled each by
    1/B (Opacus's ``loss_reduction="mean"`` convention)."""
    return float(batch) if mean else 1.0


class _Conv(torch.autograd.Function):
    """Conv2d whose backward forms the input gradient only; per-sample weight gradients
    (or the inputs of their ghost norms) and bias gradients go onto the parameters."""

    @staticmethod
    def forward(ctx, x, weight, bias, layer, mean):
        ctx.layer, ctx.scale = layer, _per_sample_scale(mean, len(x))
        ctx.save_for_backward(x, weight)
        return F.conv2d(x, weight, bias, layer.stride, layer.padding, layer.dilation,
                        layer.groups)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        layer = ctx.layer
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = aten.convolution_backward(
                grad_out, x, weight, None, list(layer.stride), list(layer.padding),
                list(layer.dilation), False, [0, 0], layer.groups, [True, False, False])[0]
        if ctx.needs_input_grad[1]:
            w, scale = layer.weight, ctx.scale
            positions = grad_out.shape[2] * grad_out.shape[3]
            if layer.groups == 1 and ghost_norm_is_cheaper(positions, w[0].numel(), len(w)):
                _store(w, _placeholder(w, len(x)), GhostConvWeight(layer, x, grad_out, scale))
            else:
                _store(w, per_sample_conv_weight_grad(layer, x, grad_out) * scale)
        if ctx.needs_input_grad[2]:
            _store(layer.bias, grad_out.sum(dim=(2, 3)) * ctx.scale)
        return grad_x, None, None, None, None


class _GroupNorm(torch.autograd.Function):
    """GroupNorm whose backward forms the input gradient and the per-sample gradients of
    the affine parameters: dγ_i[c] = Σ x̂_i·b_i, dβ_i[c] = Σ b_i over the positions."""

    @staticmethod
    def forward(ctx, x, weight, bias, layer, mean_loss):
        n, c = x.shape[:2]
        y, mean, rstd = aten.native_group_norm(x, weight, bias, n, c, x[0, 0].numel(),
                                               layer.num_groups, layer.eps)
        ctx.layer, ctx.scale = layer, _per_sample_scale(mean_loss, n)
        ctx.save_for_backward(x, weight, mean, rstd)
        return y

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, mean, rstd = ctx.saved_tensors
        layer = ctx.layer
        n, c = x.shape[:2]
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = aten.native_group_norm_backward(
                grad_out, x, mean, rstd, weight, n, c, x[0, 0].numel(), layer.num_groups,
                [True, False, False])[0]
        per_group = c // layer.num_groups
        summed = grad_out.sum(dim=(2, 3))                          # Σ b_i, [n, c]
        if ctx.needs_input_grad[1]:
            # Σ x̂_i·b_i = rstd·(Σ x_i·b_i − μ·Σ b_i): one pass over the activations
            # fewer than forming x − μ (full-resolution passes dominate this backward)
            mean_c = mean.repeat_interleave(per_group, dim=1)
            rstd_c = rstd.repeat_interleave(per_group, dim=1) * ctx.scale
            weighted = (x * grad_out).sum(dim=(2, 3))
            _store(layer.weight, (weighted - mean_c * summed) * rstd_c)
        if ctx.needs_input_grad[2]:
            _store(layer.bias, summed * ctx.scale)
        return grad_x, None, None, None, None


def _tracked(*params) -> bool:
    return torch.is_grad_enabled() and any(p is not None and p.requires_grad for p in params)


def _conv_forward(layer: nn.Conv2d, mean: bool, x, weight, bias):
    if _tracked(weight, bias):
        return _Conv.apply(x, weight, bias, layer, mean)
    return F.conv2d(x, weight, bias, layer.stride, layer.padding, layer.dilation, layer.groups)


def _group_norm_forward(layer: nn.GroupNorm, mean: bool, x):
    if _tracked(layer.weight, layer.bias):
        return _GroupNorm.apply(x, layer.weight, layer.bias, layer, mean)
    return F.group_norm(x, layer.num_groups, layer.weight, layer.bias, layer.eps)


def _rule(name: str, layer: nn.Module) -> str | None:
    """How a layer's per-sample gradients are formed: ``conv`` and ``group_norm`` by
    book-keeping, ``sampled`` by a grad sampler (:class:`_Sampled`), None when it trains
    nothing."""
    if not any(p.requires_grad for p in layer.parameters(recurse=False)):
        return None
    if isinstance(layer, nn.GroupNorm) and layer.affine:
        return "group_norm"
    if type(layer) is nn.Conv2d and pads_in_kernel(layer):
        return "conv"
    if type(layer) in SAMPLERS:
        return "sampled"
    raise ConfigError(f"grad_sample_mode=ghost_mixed: layer {name!r} ({type(layer).__name__}) "
                      f"has trainable parameters but neither a book-keeping rule (Conv2d, "
                      f"GroupNorm) nor an Opacus grad sampler; use grad_sample_mode functorch")


#: Grad samplers of layers without a book-keeping rule: Opacus's, except for convolutions
#: (Opacus's zero-pads whatever the padding mode; ours pads as the layer does).
SAMPLERS = {**GradSampleModule.GRAD_SAMPLERS, nn.Conv2d: conv2d_grad_sample}


class _Sampled:
    """Per-sample gradients of a layer without a book-keeping rule from the grad sampler
    for its type: its input is kept in the forward pass (only where gradients are
    tracked) and handed, with the output gradient, to the sampler in the backward pass."""

    def __init__(self, layer: nn.Module, mean: bool):
        self.mean, self.inputs = mean, []
        self.sampler = SAMPLERS[type(layer)]
        layer.register_forward_hook(self.keep_input)
        layer.register_full_backward_hook(self.per_sample_grads)

    def keep_input(self, layer, inputs, output) -> None:
        if _tracked(*layer.parameters(recurse=False)):
            self.inputs.append(inputs[0].detach())

    def per_sample_grads(self, layer, grad_input, grad_output) -> None:
        x = self.inputs.pop()
        scale = _per_sample_scale(self.mean, len(x))
        for p, g in self.sampler(layer, [x], grad_output[0]).items():
            if p.requires_grad:
                _store(p, g * scale)


class BookKeepingModule(nn.Module):
    """Wraps a model (as Opacus's GradSampleModule does; the model is ``_module``) so that
    its Conv2d and GroupNorm layers run through :class:`_Conv` and :class:`_GroupNorm`
    whenever gradients are tracked; under ``torch.no_grad`` they are the plain layers.
    ``loss_reduction``: ``mean`` if the loss that is backpropagated is the batch mean of
    the per-sample losses, ``sum`` if it is their sum."""

    def __init__(self, module: nn.Module, loss_reduction: str = "mean"):
        super().__init__()
        if loss_reduction not in ("mean", "sum"):
            raise ValueError(f"loss_reduction={loss_reduction!r}: use mean or sum")
        mean = loss_reduction == "mean"
        rules = {layer: _rule(name, layer) for name, layer in module.named_modules()}
        for layer, rule in rules.items():    # instance attributes: no other model changes
            if rule == "conv":
                layer._conv_forward = functools.partial(_conv_forward, layer, mean)
            elif rule == "group_norm":
                layer.forward = functools.partial(_group_norm_forward, layer, mean)
            elif rule == "sampled":
                _Sampled(layer, mean)
        self._module = module

    def forward(self, *args, **kwargs):
        return self._module(*args, **kwargs)

    def forbid_grad_accumulation(self) -> None:
        """Always forbidden here: a second backward before the step raises."""


class BookKeepingDPOptimizer(StudyDPOptimizer):
    """:class:`StudyDPOptimizer` that clips with ghost norms and book-keeping sums where
    the wrapped model left ``p.ghost_grad``; otherwise exactly its parent."""

    @property
    def _rows_change_before_clipping(self) -> bool:
        """Per-sample gradients are transformed before their norm (masks, copies averaged,
        a subject's scans summed): ghost norms do not apply."""
        return (self.sparsifier is not None or self.aug_multiplicity > 1
                or self.unit_sizes is not None)

    def clip_and_accumulate(self):
        ghosts = [getattr(p, "ghost_grad", None) for p in self.params]
        if self._rows_change_before_clipping:
            for p, ghost in zip(self.params, ghosts):
                if ghost is not None:
                    p.grad_sample, p.ghost_grad = ghost.materialise(), None
        if self._rows_change_before_clipping or all(g is None for g in ghosts):
            return super().clip_and_accumulate()
        for p in self.params:
            _check_processed_flag(p.grad_sample)
        # the ghost norms and sums read the layers' weights and saved inputs, which require
        # gradients: without no_grad every summed gradient would carry their autograd graph
        with torch.no_grad():
            block_norms = torch.stack([
                g.norms() if g is not None else p.grad_sample.flatten(1).norm(2, dim=-1)
                for p, g in zip(self.params, ghosts)], dim=1)
            factors = self.clip_factors(block_norms)
            for i, (p, ghost) in enumerate(zip(self.params, ghosts)):
                summed = (ghost.weighted_sum(factors[:, i]) if ghost is not None
                          else torch.einsum("i,i...", factors[:, i], p.grad_sample))
                p.summed_grad = summed if p.summed_grad is None else p.summed_grad + summed
                _mark_as_processed(p.grad_sample)
                p.ghost_grad = None

    def zero_grad(self, set_to_none: bool = False):
        super().zero_grad(set_to_none)
        for p in self.params:
            p.ghost_grad = None
