"""Segmentation networks for DP training: U-Net and Nested U-Net (UNet++).

Both output logits ``[B, n_classes, H, W]`` and use only layers with Opacus
per-sample-gradient samplers (see :mod:`dpstudy.models.blocks`).
"""

from torch import nn

from dpstudy.errors import ConfigError
from dpstudy.models.blocks import check_image_size, size_divisor
from dpstudy.models.nested_unet import NestedUNet
from dpstudy.models.unet import UNet

__all__ = [
    "MODELS", "NestedUNet", "UNet", "build_model", "check_image_size", "count_parameters",
    "size_divisor",
]

MODELS = ("unet", "nested_unet")
_CLASSES = {"unet": UNet, "nested_unet": NestedUNet}


def build_model(
    name: str, base_width: int = 16, depth: int = 4, n_classes: int = 9, in_channels: int = 1
) -> nn.Module:
    """Build a model by its configuration name; ConfigError on a bad name or size.

    ``depth`` must be 1–5 and ``base_width`` a positive multiple of 4 (GroupNorm groups).
    """
    if name not in MODELS:
        raise ConfigError(f"model {name!r} is unknown: use one of {', '.join(MODELS)}")
    return _CLASSES[name](in_channels=in_channels, n_classes=n_classes, base_width=base_width, depth=depth)


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters (the dimension DP noise is added in)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
