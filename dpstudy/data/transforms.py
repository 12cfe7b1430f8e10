"""Resizing, normalisation and augmentation.

Images and masks are resized differently on purpose: intensities are interpolated,
labels never are. Interpolating a label map invents classes along every boundary
(halfway between NFL=1 and INL=3 lies GCL–IPL=2), which would train the network on
pixels no annotator drew.
"""

import numpy as np
import torch
import torch.nn.functional as F

from dpstudy.errors import DataError

#: largest vertical shift of :func:`augment`, as a fraction of the height; Duke retinas
#: sit at least 90 rows (18 %) inside the frame, so the layers never leave it
MAX_SHIFT = 0.05


def _bilinear(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of ``[B, C, h, w]``, antialiased when shrinking to avoid aliasing speckle."""
    shrink = size[0] < x.shape[-2] or size[1] < x.shape[-1]
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False, antialias=shrink)


def resize_image(img: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize a 2-D image to ``size`` (rows, columns) as ``float32``."""
    x = torch.from_numpy(np.ascontiguousarray(img, dtype=np.float32))[None, None]
    return _bilinear(x, size)[0, 0].numpy()


def resize_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize a 2-D label mask to ``size`` by nearest neighbour (pixel-centre sampling).

    Each output pixel copies the input pixel under its centre, so the result holds only
    labels of the input.
    """
    h, w = mask.shape
    rows = np.minimum(((np.arange(size[0]) + 0.5) * h / size[0]).astype(int), h - 1)
    cols = np.minimum(((np.arange(size[1]) + 0.5) * w / size[1]).astype(int), w - 1)
    return np.ascontiguousarray(mask[rows[:, None], cols[None, :]], dtype=np.uint8)


def logits_to_native(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resize logits ``[C, h, w]`` or ``[B, C, h, w]`` to the native ``size``.

    Interpolating the class scores (not the argmax labels) gives smooth boundaries at
    native resolution and no invented classes: argmax of the result is the prediction.
    """
    if logits.dim() == 3:
        return _bilinear(logits[None], size)[0]
    if logits.dim() == 4:
        return _bilinear(logits, size)
    raise DataError(f"logits have shape {tuple(logits.shape)}; expected [C, h, w] or [B, C, h, w]")


#: Duke's registration padding is saturated white; it says nothing about the scan's
#: contrast and covers 0–10 % of a B-scan, so per-image statistics leave it out.
PADDING_VALUE = 255


def image_stats(image: np.ndarray, name: str = "image") -> tuple[float, float]:
    """Mean and standard deviation of one image's pixels, saturated padding excluded.

    Per-image standardisation (as nnU-Net does for non-CT modalities) uses nothing but
    the image itself, so a private run learns no statistic of its training split, and a
    new patient's scanner gain or brightness is factored out before the network sees it.
    """
    x = np.asarray(image, dtype=np.float64)
    signal = x[x < PADDING_VALUE]
    if signal.size == 0:
        signal = x.ravel()
    std = float(signal.std()) if signal.size else 0.0
    if not std > 0:
        raise DataError(f"{name}: all pixels have intensity {float(x.flat[0]) if x.size else 'n/a'}"
                        f"; an image with no contrast cannot be normalised")
    return float(signal.mean()), std


def normalisation_stats(samples) -> tuple[float, float]:
    """Mean and standard deviation of the raw intensities over all pixels of ``samples``.

    Computed on the training split only, so that no statistic of evaluation data
    reaches the model.
    """
    n, total, total_sq = 0, 0.0, 0.0
    for s in samples:
        x = s.image.astype(np.float64)
        n += x.size
        total += x.sum()
        total_sq += np.square(x).sum()
    if n == 0:
        raise DataError("normalisation needs at least one training image; the training split is empty")
    mean = total / n
    std = float(np.sqrt(max(total_sq / n - mean**2, 0.0)))
    if std == 0:
        raise DataError(f"all training pixels have intensity {mean:g}; images with no contrast cannot be normalised")
    return float(mean), std


def augment(x: torch.Tensor, y: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Label-preserving augmentation of one ``x [1, H, W]``, ``y [H, W]`` pair.

    A horizontal flip (left and right eyes mirror each other), a small vertical shift
    (retina position varies with the scan) filling exposed rows with the darkest image
    value and background labels, and a gain/offset jitter of the image only (scanner
    contrast varies; labels do not). Returns new tensors; the inputs are untouched.
    """
    u = torch.rand(3, generator=generator)
    if u[0] < 0.5:
        x, y = x.flip(-1), y.flip(-1)
    height = x.shape[-2]
    max_shift = int(MAX_SHIFT * height)
    shift = int(torch.randint(-max_shift, max_shift + 1, (1,), generator=generator)) if max_shift else 0
    if shift:
        xs, ys = torch.full_like(x, float(x.min())), torch.zeros_like(y)
        if shift > 0:
            xs[..., shift:, :], ys[shift:, :] = x[..., :-shift, :], y[:-shift, :]
        else:
            xs[..., :shift, :], ys[:shift, :] = x[..., -shift:, :], y[-shift:, :]
        x, y = xs, ys
    gain, offset = 0.9 + 0.2 * u[1], 0.2 * (u[2] - 0.5)
    return x * gain + offset, y.clone()
