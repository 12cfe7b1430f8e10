"""Nested U-Net / UNet++ (Zhou et al., 2018) built from Opacus-compatible blocks."""

import torch
from torch import nn

from dpstudy.models.blocks import ConvBlock, Up, check_architecture, check_image_size


class NestedUNet(nn.Module):
    """UNet++: nodes X^{i,j} (level ``i``, column ``j``) with dense skip connections.

    X^{i,0} is the encoder; for ``j ≥ 1``,
    X^{i,j} = ConvBlock(cat[X^{i,0}, …, X^{i,j-1}, Up(X^{i+1,j-1})]). Level ``i`` has
    ``base_width·2^i`` channels and ``depth`` is the number of 2× down-samplings, so
    image sides must be multiples of ``2**depth``. Up-sampling includes a 1×1 conv to
    the level's width (the original concatenates the raw up-sampled map).

    Without deep supervision the output is a 1×1 head on X^{0,depth}. With it, each of
    X^{0,1}, …, X^{0,depth} has a head and the forward returns the *average of their
    logits*, in training and evaluation alike: the loss, per-sample clipping and the
    metrics then see one tensor, and every head still gets gradient directly (the short
    gradient paths that motivate deep supervision), but heads are not supervised by
    separate losses as in the paper. Outputs are logits; the loss applies the softmax.
    """

    def __init__(
        self,
        in_channels: int = 1,
        n_classes: int = 9,
        base_width: int = 16,
        depth: int = 4,
        deep_supervision: bool = False,
    ):
        super().__init__()
        check_architecture(in_channels, n_classes, base_width, depth)
        self.depth = depth
        widths = [base_width * 2**i for i in range(depth + 1)]
        self.pool = nn.MaxPool2d(2)
        self.encoder = nn.ModuleList(
            ConvBlock(in_channels if i == 0 else widths[i - 1], widths[i]) for i in range(depth + 1)
        )
        # ModuleDict keys "i_j" name node X^{i,j}, j ≥ 1.
        self.ups = nn.ModuleDict()
        self.nodes = nn.ModuleDict()
        for j in range(1, depth + 1):
            for i in range(depth + 1 - j):
                self.ups[f"{i}_{j}"] = Up(widths[i + 1], widths[i])
                self.nodes[f"{i}_{j}"] = ConvBlock((j + 1) * widths[i], widths[i])
        n_heads = depth if deep_supervision else 1
        self.heads = nn.ModuleList(nn.Conv2d(widths[0], n_classes, 1) for _ in range(n_heads))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_image_size(tuple(x.shape[-2:]), self.depth)
        # columns[i] holds X^{i,0}, X^{i,1}, … as they are computed.
        columns = []
        for i, block in enumerate(self.encoder):
            x = block(self.pool(x) if i else x)
            columns.append([x])
        for j in range(1, self.depth + 1):
            for i in range(self.depth + 1 - j):
                up = self.ups[f"{i}_{j}"](columns[i + 1][j - 1])
                columns[i].append(self.nodes[f"{i}_{j}"](torch.cat([*columns[i], up], dim=1)))
        top = columns[0][-len(self.heads):]
        if len(self.heads) == 1:
            return self.heads[0](top[0])
        return torch.stack([head(t) for head, t in zip(self.heads, top)]).mean(dim=0)
