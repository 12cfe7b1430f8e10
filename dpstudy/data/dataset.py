"""The torch dataset used for training and evaluation."""

import numpy as np
import torch
from torch.utils.data import Dataset

from dpstudy.data.transforms import image_stats, resize_image, resize_mask
from dpstudy.errors import DataError


class SegmentationDataset(Dataset):
    """B-scans resized to ``image_size`` and normalised, with their label masks.

    ``stats`` is a fixed ``(mean, std)`` for every image, or ``None`` to standardise each
    image by its own pixels (:func:`~dpstudy.data.transforms.image_stats`).

    Every sample is resized once, at construction: per-item resizing would dominate the
    cost of a DP-SGD step on CPU. The native images and masks are kept as well, so that
    evaluation can score predictions at the resolution the annotators labelled.

    Attributes: ``names``, ``native_images``, ``native_masks`` (lists, in sample order),
    ``x`` ``float32 [N, 1, H, W]`` normalised images and ``y`` ``int64 [N, H, W]`` classes.
    """

    def __init__(self, samples, image_size: tuple[int, int],
                 stats: tuple[float, float] | None = None):
        samples = list(samples)
        if stats is not None and not stats[1] > 0:
            raise DataError(f"normalisation std={stats[1]} is invalid; it must be positive "
                            f"(see normalisation_stats)")
        size = (int(image_size[0]), int(image_size[1]))
        if min(size) < 1:
            raise DataError(f"image_size={image_size} is invalid; use positive (rows, columns)")
        self.image_size = size
        self.names = [s.name for s in samples]
        self.native_images = [s.image for s in samples]
        self.native_masks = [s.mask for s in samples]
        # an empty split (e.g. no val data) gives an empty dataset, not an error
        images = np.zeros((len(samples), *size), np.float32)
        masks = np.zeros((len(samples), *size), np.int64)
        for i, s in enumerate(samples):
            mean, std = stats if stats is not None else image_stats(s.image, s.name)
            images[i] = (resize_image(s.image, size) - np.float32(mean)) / np.float32(std)
            masks[i] = resize_mask(s.mask, size)
        self.x = torch.from_numpy(images)[:, None]
        self.y = torch.from_numpy(masks)

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[i], self.y[i]
