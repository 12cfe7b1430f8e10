"""Data: Duke DME B-scans or the synthetic phantom, as native-resolution samples and
training-size tensors."""

from dpstudy.data.dataset import SegmentationDataset
from dpstudy.data.duke import SPLITS, available_splits, load_split, map_raw_labels
from dpstudy.data.phantom import make_phantom, phantom_splits
from dpstudy.data.prepare import prepare_duke
from dpstudy.data.sample import Sample
from dpstudy.data.source import SYNTHETIC, DataBundle, fingerprint, load_data, resolve_data_spec
from dpstudy.data.transforms import (
    augment,
    logits_to_native,
    normalisation_stats,
    resize_image,
    resize_mask,
)

__all__ = [
    "SPLITS", "SYNTHETIC", "DataBundle", "Sample", "SegmentationDataset", "augment",
    "available_splits", "fingerprint", "load_data", "load_split", "logits_to_native",
    "make_phantom", "map_raw_labels", "normalisation_stats", "phantom_splits", "prepare_duke",
    "resize_image", "resize_mask", "resolve_data_spec",
]
