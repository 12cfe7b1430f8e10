"""Where a run computes (``--device``) and the memory format that is fastest there.

The device is how a run is computed, not what: it is left out of the run id, and every
random stream that decides *what* is computed (data order, Poisson sampling,
augmentation, sparsification masks) is drawn on the CPU, so a run is the same
experiment on any device; the noise is drawn on the device, identical in distribution.
"""

from __future__ import annotations

import torch
from torch import nn

from .config import DEVICES
from .errors import ConfigError

#: Channels-last (NHWC) models and inputs, by device type: where bench/dp_step.py measured
#: it faster for the private *and* the non-private step (README "Speed"). CUDA: cuDNN's
#: NHWC kernels (tensor cores) are the usual fast path — not yet measured here.
CHANNELS_LAST = {"cpu": True, "cuda": True, "mps": False}


def _mps_available() -> bool:
    return bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())


def resolve_device(spec: str) -> torch.device:
    """``auto``: CUDA if present, else MPS, else CPU; a named device must be usable."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available()
                            else "mps" if _mps_available() else "cpu")
    if spec not in DEVICES:
        raise ConfigError(f"device={spec!r} is not valid; choose one of {', '.join(DEVICES)}")
    if spec == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device=cuda: torch {torch.__version__} sees no CUDA GPU; use "
                          f"--device cpu (or auto)")
    if spec == "mps" and not _mps_available():
        raise ConfigError(f"device=mps: torch {torch.__version__} has no usable MPS backend; "
                          f"use --device cpu (or auto)")
    return torch.device(spec)


def memory_format(device: torch.device) -> torch.memory_format:
    return (torch.channels_last if CHANNELS_LAST.get(device.type, False)
            else torch.contiguous_format)


def place_model(model: nn.Module, device: torch.device) -> nn.Module:
    """The model on ``device`` in that device's fastest memory format."""
    return model.to(device=device, memory_format=memory_format(device))


def place_images(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A ``[B, C, H, W]`` batch on ``device`` in the format its model uses."""
    return x.to(device, non_blocking=True).contiguous(memory_format=memory_format(device))


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def describe(device: torch.device) -> dict[str, str]:
    """What config.json records: ``{"device": "cpu" | "cuda:0 (NVIDIA H200)" | …,
    "memory_format": "channels_last" | "contiguous"}``."""
    name = device.type
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        name = f"cuda:{index} ({torch.cuda.get_device_name(index)})"
    fmt = "channels_last" if memory_format(device) is torch.channels_last else "contiguous"
    return {"device": name, "memory_format": fmt}
