"""A synthetic OCT phantom: Duke-like B-scans with exact labels, from a seed.

It serves two purposes. Without Duke data configured it is the embedded default data
set, so every command runs out of the box. More importantly it is *public* pretraining
data: a network pretrained on it is fine-tuned privately on Duke, and the privacy
budget only pays for what the phantom did not already teach. It therefore mimics the
statistics that matter for transfer, measured on the Duke scans: per-layer mean
intensity and thickness, the foveal thickness profiles, speckle grain and contrast,
edema cysts, vessel shadows, choroid texture and the white registration padding.

Geometry is defined on the 496 × 512 reference grid (Duke's rows, typical width) and
scaled to the requested size. Labels are generated as the 10 raw Duke labels
(0 vitreous, 1–7 layers, 8 choroid, 9 fluid) and mapped with ``RAW_TO_CLASS``
exactly like real masks, so the two sources cannot drift apart.
"""

import numpy as np
from scipy.ndimage import gaussian_filter

from dpstudy.classes import RAW_TO_CLASS
from dpstudy.data.sample import Sample
from dpstudy.errors import DataError

REF_HEIGHT, REF_WIDTH = 496, 512
#: smallest size allowed: at 64 rows the thinnest layers are already only about a row thick
MIN_SIZE = 64
#: mean reflectivity per raw label before blur and speckle (vitreous, NFL, GCL–IPL,
#: INL, OPL, ONL–ISM, ISE, OS–RPE, fluid), tuned to Duke's class means; the choroid
#: entry is a gain on its depth profile
LEVELS = np.array([22.0, 135.0, 99.0, 77.0, 86.0, 60.0, 162.0, 194.0, 1.0, 47.0])
#: probability that a scan has edema (Duke: 62 of 88 scans)
P_FLUID = 0.7
#: hosts of the cysts: INL, OPL, ONL–ISM (raw labels) and how often each is chosen
CYST_HOSTS, CYST_HOST_P = np.array([3, 4, 5]), np.array([0.35, 0.15, 0.5])


def make_phantom(n: int, seed: int, height: int = REF_HEIGHT, width: int = REF_WIDTH) -> list[Sample]:
    """``n`` phantom B-scans named ``phantom_<seed>_<i:03d>``.

    Scan ``i`` depends only on ``(seed, i)``, so a shorter list is a prefix of a longer
    one and ``limit`` never changes what a scan looks like. Other sizes than 496 × 512
    scale the whole anatomy (a cheap small phantom for tests looks like a resized one).
    """
    if n < 0:
        raise DataError(f"phantom scan count n={n} is invalid: use n >= 0")
    if height < MIN_SIZE or width < MIN_SIZE:
        raise DataError(
            f"phantom size {height}x{width} is too small: use height and width >= {MIN_SIZE} "
            f"(the default {REF_HEIGHT}x{REF_WIDTH} matches Duke)"
        )
    samples = []
    for i in range(n):
        image, raw = _scan(np.random.default_rng([seed, i]), height, width)
        samples.append(Sample(f"phantom_{seed}_{i:03d}", image, RAW_TO_CLASS[raw]))
    return samples


def phantom_splits(
    seed: int = 0, n_train: int = 66, n_val: int = 22, n_test: int = 22,
    height: int = REF_HEIGHT, width: int = REF_WIDTH,
) -> dict[str, list[Sample]]:
    """Train/val/test phantom splits of Duke's sizes.

    Split ``k`` (train 0, val 1, test 2) uses seed ``3 * seed + k``: the map is one to one,
    so no two splits of any base seeds ever share a scan.
    """
    counts = {"train": n_train, "val": n_val, "test": n_test}
    return {split: make_phantom(n, 3 * seed + k, height, width) for k, (split, n) in enumerate(counts.items())}


def _scan(rng: np.random.Generator, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """One B-scan: ``(uint8 image, uint8 raw labels 0..9)``."""
    sy, sx = height / REF_HEIGHT, width / REF_WIDTH
    xr = np.arange(width) / sx  # columns in reference units
    rows = np.arange(height, dtype=np.float32)[:, None] + 0.5  # pixel centres

    thick, xf, pit = _thicknesses(rng, xr)
    cysts = _cysts(rng, xr, xf, pit, thick) if rng.random() < P_FLUID else []
    bound = _boundaries(rng, xr, thick) * sy  # (8, width) in pixel rows, top to bottom
    raw = np.zeros((height, width), np.uint8)
    for b in bound:  # label = number of boundaries at or above the pixel centre
        raw += rows >= b
    fluid = _draw_cysts(cysts, bound, xr, rows, sy)
    raw[fluid] = 9

    refl = _reflectivity(rng, raw, bound, rows, sy)
    _vessels(rng, refl, bound, rows, xr, sx, sy)
    refl = gaussian_filter(refl, (1.0 * sy, 0.8 * sx))  # optical point-spread function

    # spatially correlated gamma speckle (grain ~2 px, as measured on Duke) plus a noise
    # floor that, as after OCT's log compression, shows only where the signal is weak
    speckle = gaussian_filter(rng.standard_exponential((height, width), dtype=np.float32), 1.3)
    speckle = 1 + (speckle - speckle.mean()) * (0.2 / speckle.std())
    floor = gaussian_filter(rng.standard_normal((height, width), dtype=np.float32), 0.8)
    img = refl * speckle + floor * (17.0 / floor.std()) * np.exp(-refl / 90)

    # axial fall-off of the signal, lateral vignetting, then a random global contrast
    top = bound[0].mean()
    img *= np.exp(-(rows - top) / (rng.uniform(500, 1000) * sy))
    img *= 1 - rng.uniform(0, 0.3) * ((xr - rng.uniform(150, 362)) / REF_WIDTH) ** 2
    img = img * np.exp(rng.normal(0, 0.15)) + rng.normal(0, 4)
    img = np.clip(np.rint(img), 0, 255).astype(np.uint8)
    _padding(rng, img, bound, rows, xr, sy)
    return img, raw


def _smooth(rng: np.random.Generator, x: np.ndarray, amp: float, periods=(120, 500)) -> np.ndarray:
    """A smooth random curve over columns: a few random sinusoids, for gentle waviness."""
    out = np.zeros_like(x)
    for _ in range(3):
        out += np.sin(2 * np.pi * x / rng.uniform(*periods) + rng.uniform(0, 2 * np.pi))
    return amp * out / np.sqrt(1.5)


def _field(rng: np.random.Generator, height: int, width: int, cell: float) -> np.ndarray:
    """Smooth 2-D Gaussian noise (unit std) with feature size ``cell`` pixels.

    Bilinear upsampling of a coarse random grid: far cheaper than filtering a full-size
    field, and plenty smooth for texture. Done by gathers, not a matrix product, because
    multithreaded BLAS on such small matrices stalls on a busy machine.
    """
    coarse = rng.standard_normal((int(height / cell) + 2, int(width / cell) + 2), dtype=np.float32)

    def weights(n, g):
        pos = np.linspace(0, g - 1.001, n, dtype=np.float32)
        lo = pos.astype(int)
        return lo, pos - lo

    r, fr = weights(height, coarse.shape[0])
    c, fc = weights(width, coarse.shape[1])
    f = coarse[r] * (1 - fr[:, None]) + coarse[r + 1] * fr[:, None]
    f = f[:, c] * (1 - fc) + f[:, c + 1] * fc
    return f / f.std()


def _thicknesses(rng: np.random.Generator, xr: np.ndarray) -> tuple[np.ndarray, float, float]:
    """Thickness (reference rows) of raw layers 1..7 per column, the fovea column and pit radius.

    Profiles follow the anatomy: NFL thin at the fovea and growing nasally, GCL–IPL
    ring-shaped and absent at the foveola, INL/OPL thinning into the pit, ONL–ISM
    thickest at the fovea, thin and nearly constant photoreceptor/RPE bands.
    """
    xf = rng.uniform(0.3, 0.7) * REF_WIDTH
    pit = rng.uniform(30, 50)
    d = xr - xf
    g = np.exp(-0.5 * (d / pit) ** 2)
    nasal = np.clip(rng.choice([-1, 1]) * d / REF_WIDTH, 0, None)
    t = np.empty((7, xr.size))
    t[0] = 3 + 6 * (1 - g) + 30 * nasal
    ring = 1 - np.exp(-0.5 * (d / (0.75 * pit)) ** 2)
    t[1] = 29 * ring * (0.55 + 0.45 * np.exp(-0.5 * ((np.abs(d) - 1.6 * pit) / (1.8 * pit)) ** 2)) - 1.5
    t[2] = 9 * (1 - 0.85 * g) - 0.5
    t[3] = 8 * (1 - 0.5 * g)
    t[4] = 19 + 12 * g
    t[5] = 8 + 1.5 * g
    t[6] = 6.8 + 1.0 * g
    scale = rng.uniform(0.85, 1.15)
    for k in range(7):
        t[k] *= scale * (1 + _smooth(rng, xr, 0.06))
    return np.clip(t, 0, None), xf, pit


def _cysts(rng, xr, xf, pit, thick) -> list[tuple[int, float, float, float, int, float]]:
    """Edema cysts near the fovea; each swells its host layer by its own height.

    Swelling the host (rather than painting over it) reproduces the thickened retina of
    DME and keeps every cyst inside INL, OPL or ONL–ISM.
    Returns ``(host, centre col, half-width, half-height, lobes, phase)`` in reference units.
    """
    big = rng.random() < 0.35
    cysts = []
    for _ in range(1 + rng.poisson(4)):
        host = int(rng.choice(CYST_HOSTS, p=CYST_HOST_P))
        cx = float(np.clip(xf + rng.normal(0, 1.6 * pit), 8, REF_WIDTH - 8))
        a = float(np.exp(rng.uniform(np.log(3), np.log(70 if big else 25))))
        b = min(a * rng.uniform(0.5, 1.0), 40.0)
        # a flat-topped bump of the cyst's height is at least as tall as the ellipse at
        # every column, and gives the rounded dome of a swollen retina
        thick[host - 1] += (2 * b + 1) / (1 + ((xr - cx) / (1.2 * a)) ** 4)
        cysts.append((host, cx, a, b, int(rng.integers(2, 4)), float(rng.uniform(0, 2 * np.pi))))
    return cysts


def _boundaries(rng: np.random.Generator, xr: np.ndarray, thick: np.ndarray) -> np.ndarray:
    """The 8 boundaries (reference rows) stacked up from a curved, tilted Bruch's membrane."""
    c = xr - REF_WIDTH / 2
    bm = (rng.uniform(180, 262) + rng.uniform(-0.1, 0.1) * c + rng.uniform(-3e-4, 1e-4) * c**2
          + _smooth(rng, xr, 2.0))
    above = np.cumsum(thick[::-1], axis=0)[::-1]  # thickness above Bruch's membrane, per boundary
    bound = np.vstack([bm - above, bm[None]])
    shift = max(0.0, 60 - bound[0].min()) - max(0.0, bound[-1].max() - (REF_HEIGHT - 80))
    return bound + shift


def _draw_cysts(cysts, bound, xr, rows, sy) -> np.ndarray:
    """Fluid mask: lobed ellipses following the midline of their (swollen) host layer.

    Following the midline column by column (rather than a fixed centre row) keeps each
    cyst inside its host even where the layers slope into the foveal pit.
    """
    fluid = np.zeros((rows.size, xr.size), bool)
    for host, cx, a, b, lobes, phase in cysts:
        cols = np.flatnonzero(np.abs(xr - cx) < a)
        if cols.size == 0:
            continue
        c0, c1 = cols[0], cols[-1] + 1
        mid = (bound[host - 1, c0:c1] + bound[host, c0:c1]) / 2
        r0, r1 = max(int(mid.min() - b * sy), 0), min(int(mid.max() + b * sy) + 1, rows.size)
        yy = (rows[r0:r1] - mid) / (b * sy)
        xx = (xr[c0:c1] - cx) / a
        rim = 0.92 + 0.08 * np.cos(lobes * np.arctan2(yy, xx) + phase)
        fluid[r0:r1, c0:c1] |= xx**2 + yy**2 <= rim**2
    return fluid


def _reflectivity(rng, raw, bound, rows, sy) -> np.ndarray:
    """Noise-free backscatter per pixel: layer levels with intra-layer profiles and texture."""
    height, width = raw.shape
    level = (LEVELS * np.exp(rng.normal(0, 0.08, LEVELS.size))).astype(np.float32)
    refl = level[raw]
    # Duke's NFL fades with depth, ISE peaks at the ellipsoid zone and OS–RPE at the RPE:
    # shape them by the relative depth of each pixel within its layer
    for label, shape in ((1, lambda t: 1.1 - 0.2 * t),
                         (6, lambda t: 0.55 + 0.8 * np.exp(-0.5 * ((t - 0.85) / 0.2) ** 2)),
                         (7, lambda t: 0.55 + 0.75 * np.exp(-0.5 * ((t - 0.75) / 0.18) ** 2))):
        r, c = np.nonzero(raw == label)
        top, bot = bound[label - 1, c], bound[label, c]
        refl[r, c] *= shape(np.clip((r + 0.5 - top) / np.maximum(bot - top, 1e-3), 0, 1))
    # choroid: bright choriocapillaris decaying with depth, dark vessel lumens
    r0 = int(bound[-1].min())
    below = (rows[r0:] - bound[-1]) / sy
    lumen = 1 / (1 + np.exp(-3 * (_field(rng, height - r0, width, 14 * sy) - 0.4)))
    chor = level[8] * (16 + 30 * np.exp(-below / 8) + 80 * np.exp(-below / 50)) * (1 - 0.65 * lumen * (below > 10))
    refl[r0:] = np.where(raw[r0:] == 8, chor, refl[r0:])
    refl *= 1 + 0.12 * _field(rng, height, width, 12 * sy)
    # hyperreflective foci inside the retina
    for _ in range(rng.poisson(5)):
        col = int(rng.integers(0, width))
        r = min(int(rng.uniform(bound[1, col], bound[5, col])), height - 1)
        if 1 <= raw[r, col] <= 7:
            refl[max(r - 1, 0):r + 2, max(col - 1, 0):col + 2] *= 2.0
    return refl


def _vessels(rng, refl, bound, rows, xr, sx, sy) -> None:
    """Retinal vessels in the inner retina and the vertical shadows they cast below."""
    for _ in range(int(rng.integers(3, 13))):
        xv, w = rng.uniform(0, REF_WIDTH), rng.uniform(0.8, 3)
        c0, c1 = max(int((xv - 4 * w) * sx), 0), int((xv + 4 * w) * sx) + 1
        lateral = np.exp(-0.5 * ((xr[c0:c1] - xv) / w) ** 2)
        col = min(int(xv * sx), refl.shape[1] - 1)
        yv = bound[0, col] + rng.uniform(0.3, 0.9) * (bound[2, col] - bound[0, col])
        wall = 1 + 0.5 * lateral * np.exp(-0.5 * ((rows - yv) / (w * sy)) ** 2)
        shadow = 1 - rng.uniform(0.25, 0.6) * lateral * (rows > yv + w * sy)
        refl[:, c0:c1] *= wall * shadow


def _padding(rng, img, bound, rows, xr, sy) -> None:
    """White (255) registration padding with a slanted edge, as in most Duke scans.

    It stays clear of the retina, so the labels underneath are unchanged background.
    """
    c = xr - REF_WIDTH / 2
    if rng.random() < 0.6:
        edge = (rng.uniform(0, 45) + rng.uniform(-0.04, 0.04) * c) * sy
        img[rows < np.minimum(edge, bound[0] - 20 * sy)] = 255
    if rng.random() < 0.45:
        edge = (REF_HEIGHT - rng.uniform(0, 50) + rng.uniform(-0.25, 0.25) * c) * sy
        img[rows > np.maximum(edge, bound[-1] + 40 * sy)] = 255
