"""Low-rank adapters (LoRA, Hu et al. 2022) on the convolutions of a pretrained network.

Private fine-tuning of low-rank updates only (Yu et al. 2022, "Differentially private
fine-tuning of language models") noises far fewer coordinates than full fine-tuning while
every layer can still change, which a bias-only or decoder-only subset cannot. Each
adapted convolution computes ``W x + B(A x)``: ``A`` a convolution with ``W``'s kernel,
stride and padding down to ``rank`` channels, ``B`` a 1×1 convolution back, ``B`` starting
at zero so the adapted network starts equal to the pretrained one. Both are plain
``Conv2d`` layers, so Opacus and the ghost clipping sample their per-sample gradients as
for any convolution, and frozen ``W`` gets none.

``W x + B(A x) = (W + B·A) x`` exactly (both linear; ``B`` is 1×1), so the released
checkpoint merges every adapter into its ``W`` (:func:`merged_state_dict`): it has the base
architecture's keys, and every reader (evaluation, predictions, ``init_from``) loads it
unchanged.
"""

import torch
from torch import nn

#: Names of the two factors, which :mod:`dpstudy.models.trainable` trains.
DOWN, UP = "lora_down", "lora_up"


class LowRankConv(nn.Module):
    """A frozen ``Conv2d`` plus a trainable rank-``rank`` update of its weight."""

    def __init__(self, base: nn.Conv2d, rank: int):
        super().__init__()
        self.base = base
        setattr(self, DOWN, nn.Conv2d(base.in_channels, rank, base.kernel_size, base.stride,
                                      base.padding, base.dilation, bias=False,
                                      padding_mode=base.padding_mode))
        setattr(self, UP, nn.Conv2d(rank, base.out_channels, 1, bias=False))
        nn.init.zeros_(getattr(self, UP).weight)
        self.to(base.weight.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + getattr(self, UP)(getattr(self, DOWN)(x))


def is_head(name: str) -> bool:
    """The 1×1 classification head(s) of a U-Net or Nested U-Net: trained whole, never
    adapted."""
    return name.startswith(("head.", "heads.")) or name in ("head", "heads")


def add_adapters(model: nn.Module, rank: int) -> nn.Module:
    """Wrap every convolution except the classification head(s) in :class:`LowRankConv`
    (in place); returns ``model``."""
    targets = [(name, m) for name, m in model.named_modules()
               if type(m) is nn.Conv2d and not is_head(name)]
    for name, conv in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, LowRankConv(conv, rank))
    return model


@torch.no_grad()
def merged_state_dict(model: nn.Module) -> dict:
    """``model.state_dict()`` with every adapter merged into its convolution: the keys of
    the network without adapters. Read from the state, not a copy of the module, which
    Opacus's hooks would not survive."""
    adapted = {name: m for name, m in model.named_modules() if isinstance(m, LowRankConv)}
    state = {}
    for key, value in model.state_dict().items():
        owner, _, leaf = key.rpartition(".")
        prefix, _, part = owner.rpartition(".")
        if prefix in adapted and part in (DOWN, UP):
            continue                                   # folded into the base weight
        if prefix in adapted and part == "base":
            key = f"{prefix}.{leaf}" if prefix else leaf
            if leaf == "weight":
                value = value + torch.einsum("or,rikl->oikl",
                                             getattr(adapted[prefix], UP).weight[:, :, 0, 0],
                                             getattr(adapted[prefix], DOWN).weight)
        state[key] = value
    return state
