"""Which parameters a run trains: the rest keep their (pretrained) weights.

Frozen parameters get ``requires_grad = False`` before Opacus wraps the model, so they
get no per-sample gradient, no clipping share and no noise; the accountant is
unchanged (it counts steps, not coordinates). Fewer noised coordinates means less
noise in total at the same ε — the idea of DP-BiTFiT (Bu et al. 2022) and of
fine-tuning only the decoder of a pretrained encoder.
"""

from torch import nn

from dpstudy.errors import ConfigError
from dpstudy.models.adapters import DOWN, UP, is_head


RULES = {
    "all": lambda name, module: True,
    # GroupNorm affine parameters, every bias and the 1×1 classification head
    "norm_bias": lambda name, module: (isinstance(module, nn.GroupNorm) or is_head(name)
                                       or name.endswith("bias")),
    # everything after the encoder: up-sampling path, decoder nodes and head(s)
    "decoder": lambda name, module: not name.startswith("encoder."),
    # low-rank adapters (added by :func:`dpstudy.models.adapters.add_adapters` first) and
    # everything norm_bias trains
    "adapters": lambda name, module: (f".{DOWN}." in name or f".{UP}." in name
                                      or RULES["norm_bias"](name, module)),
}


def set_trainable(model: nn.Module, which: str) -> int:
    """Freeze every parameter outside ``which``; returns the number left trainable."""
    if which not in RULES:
        raise ConfigError(f"trainable={which!r} is not valid; choose one of {', '.join(RULES)}")
    rule = RULES[which]
    for module_name, module in model.named_modules():
        for name, p in module.named_parameters(recurse=False):
            full = f"{module_name}.{name}" if module_name else name
            p.requires_grad_(bool(rule(full, module)))
    n = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if n == 0:
        raise ConfigError(f"trainable={which!r} leaves no parameter of "
                          f"{type(model).__name__} to train")
    return n
