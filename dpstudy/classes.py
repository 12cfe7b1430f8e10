"""The nine training classes of the Duke DME segmentation task.

Raw Duke labels are 0 vitreous, 1–7 the retinal layers, 8 choroid (below Bruch's
membrane), 9 fluid. The study merges vitreous and choroid into background and moves
fluid to class 8, so the network predicts 9 classes.
"""

import numpy as np

CLASS_NAMES = (
    "background", "NFL", "GCL–IPL", "INL", "OPL", "ONL–ISM", "ISE", "OS–RPE", "fluid",
)
#: Names usable as column suffixes (``dice_<slug>``).
CLASS_SLUGS = (
    "background", "nfl", "gcl_ipl", "inl", "opl", "onl_ism", "ise", "os_rpe", "fluid",
)
N_CLASSES = len(CLASS_NAMES)
FOREGROUND = tuple(range(1, N_CLASSES))
N_RAW_LABELS = 10

#: raw Duke label -> training class
RAW_TO_CLASS = np.array([0, 1, 2, 3, 4, 5, 6, 7, 0, 8], dtype=np.uint8)

#: fixed display colours (RGB), one per class; background transparent in overlays
CLASS_COLOURS = (
    (0, 0, 0), (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200),
    (245, 130, 48), (145, 30, 180), (70, 240, 240), (240, 50, 230),
)
