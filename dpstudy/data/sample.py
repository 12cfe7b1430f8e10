"""One B-scan with its label mask: the unit every data source produces."""

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Sample:
    """A B-scan at native resolution.

    Kept at native resolution so that evaluation can score predictions on the pixels the
    annotators labelled, whatever size the network is trained at.
    """

    name: str
    #: 2-D ``uint8`` (or ``float32``) intensities, native resolution
    image: np.ndarray
    #: 2-D ``uint8`` training classes 0..8 (see :mod:`dpstudy.classes`)
    mask: np.ndarray
