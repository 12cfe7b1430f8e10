"""A synthetic OCT phantom: Duke-like B-scans with exact labels, from a seed.

It serves two purposes. Without Duke data configured it is the embedded default data
set, so every command runs out of the box. More importantly it is *public* pretraining
data: a network pretrained on it is fine-tuned privately on Duke, and the privacy
budget only pays for what the phantom did not already teach. It therefore mimics the
statistics that matter for transfer: per-layer intensity and thickness, the foveal
profiles, speckle, edema cysts, vessel shadows, choroid texture, white padding.

**Provenance.** The phantom is public only if nothing in it was learned from the private
training subjects (Duke 1–6). Every parameter fitted to data was measured on the
*validation* subjects 7–8 only, with :mod:`dpstudy.data.phantom_stats` (``python -m
dpstudy.data.phantom_stats DUKE --split val``, which prints the same statistics for the
phantom and, with ``--fit-levels``, fits ``LEVELS``):

* ``LEVELS`` (per-label reflectivity), the intra-layer shapes of NFL, ISE and OS–RPE and
  the choroid's depth profile: fitted so the rendered per-label means and depth profiles
  match subjects 7–8.
* Layer thicknesses against distance from the foveola (``_thicknesses``), the foveal pit
  width, the nasal NFL slope: fitted to the 3 foveal scans of subjects 7–8 (the other 19
  are away from the fovea; they set nothing in the standard phantom).
* Retinal position, tilt and curvature ranges (``_boundaries``): mean ± √3·sd of subjects
  7–8, tilt made symmetric (left and right eyes).
* Speckle contrast and grain, noise floor (``_render``): fitted to the ONL–ISM residual
  contrast, its one-pixel axial and lateral correlation and the vitreous mean and std.
* Edema: prevalence ``P_FLUID``, host layers ``CYST_HOST_P``, cyst count and size: from
  the fluid in subjects 7–8 (12 of 22 scans, 38 cysts).
* Padding: the share of scans with white padding at the top and at the bottom.

Not fitted to any data, hand-set as generic OCT appearance: vessel count and shadow
strength, hyperreflective foci, axial fall-off, vignetting, the global gain spread.

**Domain randomisation.** ``dr`` in [0, 1] widens every parameter range from its
standard (fitted) interval at ``dr = 0`` linearly to a wide one at ``dr = 1``, so that real
patients — brighter or darker, thicker or thinner retinas, scans away from the fovea,
more edema, other devices' contrast — fall inside what pretraining saw. ``dr = 0`` is the
standard phantom exactly.

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
#: INL, OPL, ONL–ISM, ISE, OS–RPE, fluid), fitted to subjects 7–8's label means; the
#: choroid entry is a gain on its depth profile
LEVELS = np.array([22.68, 140.26, 97.0, 76.21, 87.78, 61.3, 153.91, 189.68, 1.03, 53.86])
#: probability that a scan has edema (subjects 7–8: 12 of 22 scans)
P_FLUID = 0.55
#: hosts of the cysts: INL, OPL, ONL–ISM (raw labels) and how often each is chosen
CYST_HOSTS, CYST_HOST_P = np.array([3, 4, 5]), np.array([0.12, 0.08, 0.8])


def make_phantom(n: int, seed: int, height: int = REF_HEIGHT, width: int = REF_WIDTH,
                 dr: float = 0.0) -> list[Sample]:
    """``n`` phantom B-scans named ``phantom_<seed>_<i:03d>`` at randomisation strength ``dr``.

    Scan ``i`` depends only on ``(seed, i, dr)``, so a shorter list is a prefix of a longer
    one and ``limit`` never changes what a scan looks like. Other sizes than 496 × 512
    scale the whole anatomy (a cheap small phantom for tests looks like a resized one).
    """
    return [Sample(f"phantom_{seed}_{i:03d}", image, RAW_TO_CLASS[raw])
            for i, (image, raw) in enumerate(phantom_pairs(n, seed, height, width, dr))]


def phantom_pairs(n: int, seed: int, height: int = REF_HEIGHT, width: int = REF_WIDTH,
                  dr: float = 0.0, levels: np.ndarray = LEVELS) -> list[tuple[np.ndarray, np.ndarray]]:
    """``(uint8 image, uint8 raw labels 0..9)`` of the scans :func:`make_phantom` returns.

    Raw labels keep vitreous and choroid apart, which :mod:`dpstudy.data.phantom_stats`
    needs; ``levels`` lets it fit ``LEVELS``.
    """
    if n < 0:
        raise DataError(f"phantom scan count n={n} is invalid: use n >= 0")
    if height < MIN_SIZE or width < MIN_SIZE:
        raise DataError(
            f"phantom size {height}x{width} is too small: use height and width >= {MIN_SIZE} "
            f"(the default {REF_HEIGHT}x{REF_WIDTH} matches Duke)"
        )
    if not 0 <= dr <= 1:
        raise DataError(f"phantom randomisation dr={dr} is invalid: use 0 <= dr <= 1")
    return [_scan(_Vary(np.random.default_rng([seed, i]), dr), height, width, levels) for i in range(n)]


def phantom_splits(
    seed: int = 0, n_train: int = 66, n_val: int = 22, n_test: int = 22,
    height: int = REF_HEIGHT, width: int = REF_WIDTH, dr: float = 0.0,
) -> dict[str, list[Sample]]:
    """Train/val/test phantom splits of Duke's sizes.

    Split ``k`` (train 0, val 1, test 2) uses seed ``3 * seed + k``: the map is one to one,
    so no two splits of any base seeds ever share a scan.
    """
    counts = {"train": n_train, "val": n_val, "test": n_test}
    return {split: make_phantom(n, 3 * seed + k, height, width, dr)
            for k, (split, n) in enumerate(counts.items())}


class _Vary:
    """One scan's random draws, each between a standard range and a wide one.

    ``u(std, wide)`` draws uniformly between bounds moved linearly from ``std`` (dr = 0)
    to ``wide`` (dr = 1); ``wide`` defaults to ``std`` (not randomised further).
    """

    def __init__(self, rng: np.random.Generator, dr: float):
        self.rng, self.dr = rng, dr

    def lerp(self, std: float, wide: float) -> float:
        return std + self.dr * (wide - std)

    def u(self, std: tuple[float, float], wide: tuple[float, float] | None = None) -> float:
        wide = std if wide is None else wide
        lo, hi = self.lerp(std[0], wide[0]), self.lerp(std[1], wide[1])
        return lo + (hi - lo) * self.rng.random()

    def chance(self, p_std: float, p_wide: float | None = None) -> bool:
        return self.rng.random() < self.lerp(p_std, p_std if p_wide is None else p_wide)

    def lognormal(self, sd_std: float, sd_wide: float, size=None):
        return np.exp(self.rng.normal(0, self.lerp(sd_std, sd_wide), size))


def _scan(v: _Vary, height: int, width: int, levels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One B-scan: ``(uint8 image, uint8 raw labels 0..9)``."""
    rng = v.rng
    sy, sx = height / REF_HEIGHT, width / REF_WIDTH
    xr = np.arange(width) / sx  # columns in reference units
    rows = np.arange(height, dtype=np.float32)[:, None] + 0.5  # pixel centres

    thick, xf, pit = _thicknesses(v, xr)
    cysts = _cysts(v, xr, xf, pit, thick) if v.chance(P_FLUID, 0.75) else []
    bound = (_boundaries(v, xr, thick) * sy).astype(np.float32)  # (8, width) pixel rows, top to bottom
    raw = np.zeros((height, width), np.uint8)
    for b in bound:  # label = number of boundaries at or above the pixel centre
        raw += rows >= b
    fluid = _draw_cysts(cysts, bound, xr, rows, sy)
    raw[fluid] = 9

    refl = _reflectivity(v, raw, bound, rows, sy, levels)
    _vessels(v, refl, bound, rows, xr, sx, sy)
    blur = v.u((1.0, 1.0), (0.6, 2.2))
    refl = gaussian_filter(refl, (1.0 * blur * sy, 0.6 * blur * sx))  # optical point-spread function
    img = _render(v, refl, bound, rows, xr, sy)
    _padding(v, img, bound, rows, xr, sy)
    return img, raw


def _render(v: _Vary, refl, bound, rows, xr, sy) -> np.ndarray:
    """Speckle, noise floor, fall-off, contrast and gamma: backscatter to 8-bit grey levels.

    Speckle is spatially correlated gamma noise, finer laterally than axially (as the
    ONL–ISM residual of subjects 7–8); the noise floor, as after OCT's log compression,
    shows only where the signal is weak.
    """
    rng = v.rng
    height, width = refl.shape
    grain = v.u((1.0, 1.0), (0.6, 2.0)) * np.array([0.65, 0.6])  # filter sigmas (pixels): rows, columns
    speckle = gaussian_filter(rng.standard_exponential((height, width), dtype=np.float32), grain)
    speckle = 1 + (speckle - speckle.mean()) * (v.u((0.03, 0.03), (0.02, 0.3)) / speckle.std())
    floor = gaussian_filter(rng.standard_normal((height, width), dtype=np.float32), grain)
    img = refl * speckle + floor * (v.u((22.0, 22.0), (8.0, 45.0)) / floor.std()) * np.exp(-refl / 40)

    # axial fall-off of the signal, lateral vignetting, then a random global contrast and gamma
    img *= np.exp(-(rows - bound[0].mean()) / (v.u((500, 1000), (250, 2000)) * sy))
    img *= 1 - v.u((0, 0.3), (0, 0.8)) * ((xr - v.u((150, 362), (0, 512))) / REF_WIDTH) ** 2
    img = img * v.lognormal(0.09, 0.25) + rng.normal(0, v.lerp(4, 12))
    img = 255 * (np.clip(img, 0, 255) / 255) ** v.u((1.0, 1.0), (0.7, 1.5))
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


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


def _thicknesses(v: _Vary, xr: np.ndarray) -> tuple[np.ndarray, float, float]:
    """Thickness (reference rows) of raw layers 1..7 per column, the fovea column and pit radius.

    Profiles follow the anatomy and subjects 7–8's foveal scans: NFL thin at the fovea
    and growing nasally, GCL–IPL ring-shaped and absent at the foveola, INL/OPL thinning
    into the pit, ONL–ISM thickest at the fovea, thin, nearly constant photoreceptor/RPE
    bands. A scan ``dy`` columns away from the fovea (randomised variant only) reads the
    same profiles at the distance ``hypot(x - xf, dy)``: a shallower pit, or none.
    """
    rng = v.rng
    xf = v.u((0.3, 0.7), (0.05, 0.95)) * REF_WIDTH
    dy = v.u((0, 0), (30, 260)) if v.chance(0, 0.6) else 0.0
    pit = v.u((34, 48), (18, 75))
    depth = v.u((1, 1), (0.4, 1))
    d = xr - xf
    r = np.hypot(d, dy)
    g = depth * np.exp(-0.5 * (r / pit) ** 2)
    gw = depth * np.exp(-0.5 * (r / (3 * pit)) ** 2)  # the wider bulge of the outer retina
    nasal = np.clip(rng.choice([-1, 1]) * d / REF_WIDTH, 0, None)
    t = np.empty((7, xr.size))
    t[0] = 3.5 + 2 * (1 - g) + 14 * nasal + 20 * dy / REF_WIDTH
    # GCL–IPL: V-shaped pit inside a ring that peaks about 3 pit radii out
    t[1] = (14 + 10 * np.exp(-0.5 * ((r - 3 * pit) / (2 * pit)) ** 2)) * (1 - depth * np.exp(-r / (0.55 * pit))) - 1
    t[2] = 8.8 * (1 - 0.25 * g)
    t[3] = 8.6 * (1 - 0.2 * g)
    t[4] = 22 + 7 * gw
    t[5] = 8.4 + 1.6 * gw
    t[6] = 7.8 + 0.6 * gw
    scale = v.u((0.9, 1.1), (0.7, 1.4))
    wave = v.lerp(0.06, 0.12)
    for k in range(7):
        t[k] *= scale * v.u((1, 1), (0.75, 1.35)) * (1 + _smooth(rng, xr, wave))
    return np.clip(t, 0, None), xf, pit


def _cysts(v: _Vary, xr, xf, pit, thick) -> list[tuple[int, float, float, float, int, float]]:
    """Edema cysts near the fovea; each swells its host layer by its own height.

    Swelling the host (rather than painting over it) reproduces the thickened retina of
    DME and keeps every cyst inside INL, OPL or ONL–ISM. Cysts of one host share its
    midline, so the host swells by the tallest of them, not by their sum.
    Returns ``(host, centre col, half-width, half-height, lobes, phase)`` in reference units.
    """
    rng = v.rng
    big = v.chance(0.2, 0.6)
    a_max = v.lerp(40, 110) if big else 28
    b_max = v.lerp(25, 55)
    cysts, swell = [], np.zeros_like(thick)
    for _ in range(1 + rng.poisson(v.lerp(3, 9))):
        host = int(rng.choice(CYST_HOSTS, p=CYST_HOST_P))
        cx = float(np.clip(xf + rng.normal(0, 1.6 * pit), 8, REF_WIDTH - 8))
        a = float(np.exp(rng.uniform(np.log(3), np.log(a_max))))
        b = min(a * rng.uniform(0.5, 1.0), b_max)
        # a flat-topped bump of the cyst's height is at least as tall as the ellipse at
        # every column, and gives the rounded dome of a swollen retina
        swell[host - 1] = np.maximum(swell[host - 1], (2 * b + 1) / (1 + ((xr - cx) / (1.2 * a)) ** 4))
        cysts.append((host, cx, a, b, int(rng.integers(2, 4)), float(rng.uniform(0, 2 * np.pi))))
    thick += swell
    return cysts


def _boundaries(v: _Vary, xr: np.ndarray, thick: np.ndarray) -> np.ndarray:
    """The 8 boundaries (reference rows) stacked up from a curved, tilted Bruch's membrane."""
    c = xr - REF_WIDTH / 2
    bm = (v.u((193, 235), (140, 330)) + v.u((-0.08, 0.08), (-0.2, 0.2)) * c
          + v.u((-4e-4, 0), (-8e-4, 2e-4)) * c**2 + _smooth(v.rng, xr, v.lerp(2.0, 5.0)))
    above = np.cumsum(thick[::-1], axis=0)[::-1]  # thickness above Bruch's membrane, per boundary
    bound = np.vstack([bm - above, bm[None]])
    if np.ptp(bound) > REF_HEIGHT - 140:  # too tall and tilted to fit: flatten Bruch's membrane
        bound -= bm - bm.mean()
    # at least 60 rows of vitreous above and 80 of choroid below; the choroid comes first
    shift = max(0.0, 60 - bound[0].min())
    return bound + shift - max(0.0, bound[-1].max() + shift - (REF_HEIGHT - 80))


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


def _reflectivity(v: _Vary, raw, bound, rows, sy, levels) -> np.ndarray:
    """Noise-free backscatter per pixel: layer levels with intra-layer profiles and texture."""
    rng = v.rng
    height, width = raw.shape
    level = (levels * v.lognormal(0.05, 0.2, levels.size)).astype(np.float32)
    refl = level[raw]
    # the NFL fades with depth (subjects 7–8: ISE and OS–RPE are flat within the layer)
    r, c = np.nonzero(raw == 1)
    refl[r, c] *= 1.1 - 0.2 * np.clip((r + 0.5 - bound[0, c]) / np.maximum(bound[1, c] - bound[0, c], 1e-3), 0, 1)
    # choroid: bright choriocapillaris decaying with depth, dark vessel lumens
    r0 = int(bound[-1].min())
    below = (rows[r0:] - bound[-1]) / sy
    lumen = 1 / (1 + np.exp(-3 * (_field(rng, height - r0, width, 14 * sy) - 0.4)))
    chor = level[8] * (18 + 25 * np.exp(-below / 8) + 80 * np.exp(-below / 70)) * (1 - 0.65 * lumen * (below > 10))
    refl[r0:] = np.where(raw[r0:] == 8, chor, refl[r0:])
    # fine texture, and (randomised variant) a smooth large-scale inhomogeneity
    refl *= 1 + v.lerp(0.12, 0.3) * _field(rng, height, width, 12 * sy)
    refl *= np.exp(v.u((0, 0), (0, 0.35)) * _field(rng, height, width, 120 * sy))
    # hyperreflective foci inside the retina
    for _ in range(rng.poisson(v.lerp(5, 15))):
        col = int(rng.integers(0, width))
        r = min(int(rng.uniform(bound[1, col], bound[5, col])), height - 1)
        if 1 <= raw[r, col] <= 7:
            refl[max(r - 1, 0):r + 2, max(col - 1, 0):col + 2] *= 2.0
    return np.maximum(refl, 0)


def _vessels(v: _Vary, refl, bound, rows, xr, sx, sy) -> None:
    """Retinal vessels in the inner retina and the vertical shadows they cast below."""
    rng = v.rng
    for _ in range(int(v.u((3, 13), (0, 21)))):
        xv, w = rng.uniform(0, REF_WIDTH), rng.uniform(0.8, 3)
        c0, c1 = max(int((xv - 4 * w) * sx), 0), int((xv + 4 * w) * sx) + 1
        lateral = np.exp(-0.5 * ((xr[c0:c1] - xv) / w) ** 2)
        col = min(int(xv * sx), refl.shape[1] - 1)
        yv = bound[0, col] + rng.uniform(0.3, 0.9) * (bound[2, col] - bound[0, col])
        wall = 1 + 0.5 * lateral * np.exp(-0.5 * ((rows - yv) / (w * sy)) ** 2)
        shadow = 1 - v.u((0.25, 0.6), (0.05, 0.9)) * lateral * (rows > yv + w * sy)
        refl[:, c0:c1] *= wall * shadow


def _padding(v: _Vary, img, bound, rows, xr, sy) -> None:
    """White (255) registration padding with a slanted edge, as in most Duke scans.

    It stays clear of the retina, so the labels underneath are unchanged background.
    """
    c = xr - REF_WIDTH / 2
    if v.chance(0.9):
        edge = (v.u((0, 20), (0, 110)) + v.rng.uniform(-0.04, 0.04) * c) * sy
        img[rows < np.minimum(edge, bound[0] - 20 * sy)] = 255
    if v.chance(0.4):
        edge = (REF_HEIGHT - v.u((0, 35), (0, 110)) + v.rng.uniform(-0.25, 0.25) * c) * sy
        img[rows > np.maximum(edge, bound[-1] + 40 * sy)] = 255
