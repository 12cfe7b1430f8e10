"""Building blocks shared by the U-Net and the Nested U-Net, chosen for Opacus.

DP-SGD clips each sample's gradient, so every layer must have a per-sample-gradient
sampler in Opacus and must not mix samples in the forward pass:

* GroupNorm, not BatchNorm: batch statistics make one sample's output (and so its
  gradient) depend on the other samples, which breaks per-sample clipping; Opacus
  rejects BatchNorm outright.
* Up-sampling is bilinear interpolation followed by a 1×1 convolution, not
  ``ConvTranspose2d``: Opacus's hooks have no per-sample-gradient sampler for
  ``ConvTranspose2d`` and fall back to a slow functorch path.
"""

import math

from torch import nn

from dpstudy.errors import ConfigError

#: Largest number of GroupNorm groups; a layer uses ``gcd(MAX_GROUPS, channels)``.
MAX_GROUPS = 8
#: ``base_width`` must be a multiple of this, so that every GroupNorm (widths are
#: ``base_width·2^k``) has 4 or 8 groups instead of degenerating to a LayerNorm.
WIDTH_MULTIPLE = 4
MIN_DEPTH, MAX_DEPTH = 1, 5


def group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm whose group count always divides ``channels``."""
    return nn.GroupNorm(math.gcd(MAX_GROUPS, channels), channels)


class ConvBlock(nn.Sequential):
    """(3×3 conv → GroupNorm → ReLU) × 2; conv bias off, GroupNorm's shift replaces it.

    ReLU is not in-place: Opacus's backward hooks wrap GroupNorm's output, and
    modifying it in place is an autograd error.
    """

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(
            nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
            group_norm(out_channels),
            nn.ReLU(),
            nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
            group_norm(out_channels),
            nn.ReLU(),
        )


class Up(nn.Sequential):
    """×2 bilinear up-sampling then a 1×1 conv to ``out_channels``.

    Replaces ``ConvTranspose2d``, which Opacus's hooks cannot sample per-sample
    gradients for (it falls back to a slow path).
    """

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(
            nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
            nn.Conv2d(in_channels, out_channels, 1),
        )


def check_depth(depth: int) -> None:
    if isinstance(depth, bool) or not isinstance(depth, int) or not MIN_DEPTH <= depth <= MAX_DEPTH:
        raise ConfigError(
            f"model depth {depth!r} is invalid: use an integer from {MIN_DEPTH} to {MAX_DEPTH}"
        )


def check_architecture(in_channels: int, n_classes: int, base_width: int, depth: int) -> None:
    """Reject arguments that would build a broken or Opacus-incompatible network."""
    check_depth(depth)
    if (
        isinstance(base_width, bool)
        or not isinstance(base_width, int)
        or base_width <= 0
        or base_width % WIDTH_MULTIPLE
    ):
        raise ConfigError(
            f"model base_width {base_width!r} is invalid: use a positive multiple of "
            f"{WIDTH_MULTIPLE} (e.g. 8, 16, 32) so every GroupNorm has 4 or 8 groups"
        )
    for field, value, low in (("in_channels", in_channels, 1), ("n_classes", n_classes, 2)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ConfigError(f"model {field} {value!r} is invalid: use an integer >= {low}")


def size_divisor(depth: int) -> int:
    """Image height and width must be multiples of this: each level halves them."""
    check_depth(depth)
    return 2**depth


def check_image_size(size: tuple[int, int], depth: int) -> None:
    """Raise ConfigError unless ``size`` (height, width) suits a network of ``depth``.

    Without this a bad size fails deep inside the forward pass as a cryptic
    concatenation shape mismatch between a skip and an up-sampled map.
    """
    div = size_divisor(depth)
    if (
        not isinstance(size, (tuple, list))
        or len(size) != 2
        or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in size)
    ):
        raise ConfigError(f"image size {size!r} is invalid: give (height, width) as positive integers")
    if size[0] % div == 0 and size[1] % div == 0:
        return
    down = tuple(s // div * div for s in size)
    up = tuple(-(-s // div) * div for s in size)
    options = f"{down} or {up}" if min(down) > 0 else f"{up}"
    raise ConfigError(
        f"image size {tuple(size)} does not suit model depth {depth}: height and width must be "
        f"multiples of 2**{depth} = {div}; nearest valid sizes: {options}"
    )
