"""Per-sample convolution weight gradients from PyTorch's own convolution backward.

Opacus's ``hooks`` sampler for ``nn.Conv2d`` unfolds the input (im2col: k² copies of
every activation) and multiplies per sample with ``bmm``. On a CPU that copy dominates:
at the quick profile's top level (8 channels, 128², batch 8) it takes ≈ 33 ms where the
native (oneDNN) weight gradient of *one* sample takes ≈ 0.5 ms. Running the native
kernel once per sample gives the same per-sample gradients (up to float32 summation
order) several times faster. Registered per model instance, never globally, so plain
``hooks`` mode stays Opacus's own implementation for comparison.

On a GPU one kernel launch per sample is the slow part instead, so there the batch is
folded into the channels and the per-sample gradients come from *one* grouped
convolution backward (groups × batch): :data:`PER_SAMPLE_CONV` chooses by device.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from opacus.grad_sample.conv import compute_conv_grad_sample
from torch import nn

#: How per-sample convolution weight gradients are formed, by device type: ``loop`` (one
#: native weight gradient per sample) or ``grouped`` (one grouped convolution backward
#: for the whole batch). CPU: measured (bench/README.md); CUDA: the batched form, as
#: one launch per sample per layer is what a GPU is slow at — not yet measured.
PER_SAMPLE_CONV = {"cpu": "loop", "cuda": "grouped", "mps": "loop"}


def pads_in_kernel(layer: nn.Conv2d) -> bool:
    """Whether the convolution kernels take this layer's padding as it is (numeric zero
    padding); otherwise its forward pads the input first (reflect/replicate/circular
    modes, ``padding="same"``)."""
    return layer.padding_mode == "zeros" and not isinstance(layer.padding, str)


def _padded(layer: nn.Conv2d, x: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    """(input, numeric zero padding) that the convolution backward needs: the input
    padded first where the layer's own forward does so. (Opacus's Conv2d sampler
    zero-pads whatever the padding mode, so its per-sample gradients of such a layer are
    wrong at the borders.)"""
    if pads_in_kernel(layer):
        return x, list(layer.padding)
    mode = "constant" if layer.padding_mode == "zeros" else layer.padding_mode
    return F.pad(x, layer._reversed_padding_repeated_twice, mode=mode), [0, 0]


def _weight_grad(layer: nn.Conv2d, x, backprops, weight, groups: int, padding: list[int]
                 ) -> torch.Tensor:
    return torch.ops.aten.convolution_backward(
        backprops, x, weight, None, list(layer.stride), padding,
        list(layer.dilation), False, [0, 0], groups, [False, True, False])[1]


def per_sample_conv_weight_grad(layer: nn.Conv2d, x: torch.Tensor, backprops: torch.Tensor,
                                method: str | None = None) -> torch.Tensor:
    """``[B, *layer.weight.shape]``: sample i's gradient of ``layer.weight``, given the
    layer's input ``x`` and the loss gradient ``backprops`` of its output.
    ``method`` (``loop`` | ``grouped``) defaults to :data:`PER_SAMPLE_CONV` of x's device."""
    method = method or PER_SAMPLE_CONV.get(x.device.type, "loop")
    w = layer.weight
    x, padding = _padded(layer, x)                      # once for the whole batch
    if method == "loop":
        return torch.stack([_weight_grad(layer, x[i:i + 1], backprops[i:i + 1], w,
                                         layer.groups, padding) for i in range(len(x))])
    if method == "grouped":
        n = len(x)
        folded = _weight_grad(layer, x.reshape(1, -1, *x.shape[2:]),
                              backprops.reshape(1, -1, *backprops.shape[2:]),
                              w.repeat(n, 1, 1, 1), layer.groups * n, padding)
        return folded.view(n, *w.shape)
    raise ValueError(f"unknown per-sample convolution method {method!r}")


def conv2d_grad_sample(layer: nn.Conv2d, activations: list[torch.Tensor],
                       backprops: torch.Tensor) -> dict[nn.Parameter, torch.Tensor]:
    """Opacus grad-sampler signature: {parameter: per-sample gradient (batch first)}."""
    x = activations[0].to(backprops.dtype)
    if not len(x):
        return compute_conv_grad_sample(layer, activations, backprops)  # empty: zeros
    out: dict[nn.Parameter, torch.Tensor] = {}
    if layer.weight.requires_grad:
        out[layer.weight] = per_sample_conv_weight_grad(layer, x, backprops)
    if layer.bias is not None and layer.bias.requires_grad:
        out[layer.bias] = backprops.sum(dim=(2, 3))
    return out


def use_native_conv_grad_sample(grad_sample_module: nn.Module) -> None:
    """Make this GradSampleModule (``hooks`` mode) use :func:`conv2d_grad_sample`; an
    instance attribute, so other models keep Opacus's samplers."""
    grad_sample_module.GRAD_SAMPLERS = {**type(grad_sample_module).GRAD_SAMPLERS,
                                        nn.Conv2d: conv2d_grad_sample}
