"""U-Net (Ronneberger et al., 2015) built from Opacus-compatible blocks."""

import torch
from torch import nn

from dpstudy.models.blocks import ConvBlock, Up, check_architecture, check_image_size


class UNet(nn.Module):
    """Encoder–decoder with skip concatenation; level ``k`` has ``base_width·2^k`` channels.

    ``depth`` is the number of 2× down-samplings, so image sides must be multiples of
    ``2**depth``. The 1×1 head returns logits: the loss applies the only softmax.
    """

    def __init__(self, in_channels: int = 1, n_classes: int = 9, base_width: int = 16, depth: int = 4):
        super().__init__()
        check_architecture(in_channels, n_classes, base_width, depth)
        self.depth = depth
        widths = [base_width * 2**k for k in range(depth + 1)]
        self.encoder = nn.ModuleList(
            ConvBlock(in_channels if k == 0 else widths[k - 1], widths[k]) for k in range(depth + 1)
        )
        self.pool = nn.MaxPool2d(2)
        levels = range(depth - 1, -1, -1)  # decoder runs from the deepest level up
        self.ups = nn.ModuleList(Up(widths[k + 1], widths[k]) for k in levels)
        self.decoder = nn.ModuleList(ConvBlock(2 * widths[k], widths[k]) for k in levels)
        self.head = nn.Conv2d(widths[0], n_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_image_size(tuple(x.shape[-2:]), self.depth)
        skips = []
        for k, block in enumerate(self.encoder):
            x = block(self.pool(x) if k else x)
            skips.append(x)
        x = skips.pop()
        for up, block in zip(self.ups, self.decoder):
            x = block(torch.cat([skips.pop(), up(x)], dim=1))
        return self.head(x)
