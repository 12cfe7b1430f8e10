"""The statistics the phantom is fitted to, measured the same way on Duke and on the phantom.

The phantom is public pretraining data only if nothing in it was learned from the
private training subjects, so its parameters are derived from the validation split
(subjects 7–8) with this module, and the tests compare the phantom with the same
numbers. Everything works on ``(image, raw labels 0..9)`` pairs at Duke's 496 rows.

    python -m dpstudy.data.phantom_stats /work/shared/data/DukeData --split val
    python -m dpstudy.data.phantom_stats synthetic --n 66          # the phantom, same table
    python -m dpstudy.data.phantom_stats DUKE --split val --fit-levels   # LEVELS for phantom.py
"""

import argparse
import json
from pathlib import Path

import numpy as np
from scipy.ndimage import gaussian_filter, label, uniform_filter1d

from dpstudy.errors import DataError

#: raw labels 1..7 are the retinal layers, 9 is fluid
LAYERS, FLUID = range(1, 8), 9
#: lateral distance from the foveola (reference columns) at which the profile is read
PROFILE_BINS = ((0, 15), (15, 40), (40, 80), (80, 150), (150, 260))
#: depth below Bruch's membrane (rows) at which the choroid's brightness is read
CHOROID_BINS = ((0, 4), (4, 10), (10, 20), (20, 40), (40, 80), (80, 150))


def load_raw_split(root, split: str) -> list[tuple[np.ndarray, np.ndarray]]:
    """``(image, raw mask)`` pairs of a prepared Duke split, raw labels kept (0 vitreous, 8 choroid)."""
    images = Path(root) / split / "images"
    files = sorted(p for p in images.glob("*.npy")) if images.is_dir() else []
    if not files:
        raise DataError(f"{images} holds no .npy B-scans; expected <root>/<split>/images/<name>.npy")
    return [(np.load(p, allow_pickle=False), np.load(images.parent / "masks" / p.name, allow_pickle=False))
            for p in files]


def label_means(pairs) -> dict[int, float]:
    """Mean intensity per raw label over all scans, white (255) padding excluded."""
    img = np.concatenate([i.ravel() for i, _ in pairs]).astype(float)
    raw = np.concatenate([m.ravel() for _, m in pairs])
    keep = img < 255
    return {k: float(img[keep & (raw == k)].mean()) for k in range(10) if (keep & (raw == k)).any()}


def per_scan_layer_means(pairs) -> np.ndarray:
    """(scans, 7): each scan's mean intensity of layers 1..7 (NaN where a layer is absent)."""
    out = np.full((len(pairs), 7), np.nan)
    for s, (img, raw) in enumerate(pairs):
        for k in LAYERS:
            sel = (raw == k) & (img < 255)
            if sel.any():
                out[s, k - 1] = img[sel].mean()
    return out


def geometry(raw: np.ndarray) -> dict[str, float]:
    """One scan's retina: top (ILM) and Bruch's membrane rows, thickness, BM tilt and curvature.

    Thickness counts fluid (the edematous retina); tilt is rows per column and curvature
    the quadratic coefficient of a fit to Bruch's membrane over centred columns.
    """
    retina = ((raw >= 1) & (raw <= 7)) | (raw == FLUID)
    cols = np.flatnonzero(retina.any(0))
    top = np.argmax(retina[:, cols], 0)
    bm = raw.shape[0] - np.argmax(retina[::-1, cols], 0)
    c = cols - raw.shape[1] / 2
    curv, tilt, _ = np.polyfit(c, bm, 2)
    return {"top": float(top.mean()), "bm": float(bm.mean()), "thickness": float((bm - top).mean()),
            "tilt": float(tilt), "curvature": float(curv)}


def fovea(raw: np.ndarray) -> int | None:
    """Column of the foveola, or None for a scan away from the fovea.

    The GCL–IPL vanishes at the foveola: a scan is foveal where its smoothed GCL–IPL
    thickness falls below a quarter of its median in the central 60 % of the columns.
    """
    gcl = uniform_filter1d((raw == 2).sum(0).astype(float), 9)
    lo, hi = int(0.2 * gcl.size), int(0.8 * gcl.size)
    col = lo + int(np.argmin(gcl[lo:hi]))
    return col if gcl[col] < 0.25 * np.median(gcl) else None


def thickness_profile(pairs) -> dict:
    """Layer thickness (rows, fluid excluded) against distance from the foveola.

    ``profile[b][k]`` is layer ``k+1``'s mean thickness in foveal scans at lateral distances
    in ``PROFILE_BINS[b]`` (reference columns, either side); ``nasal``/``temporal`` are NFL
    at 150–260 columns on the side where it is thicker/thinner; ``off_fovea`` is each
    layer's mean in the scans without a pit; ``pit_halfwidth`` is where GCL–IPL regains half
    its thickness at 80–150 columns.
    """
    prof = [[[] for _ in LAYERS] for _ in PROFILE_BINS]
    off, sides, half = [], [], []
    for _, raw in pairs:
        thick = np.stack([(raw == k).sum(0) for k in LAYERS]).astype(float)
        xf = fovea(raw)
        if xf is None:
            off.append(thick.mean(1))
            continue
        d = np.arange(raw.shape[1]) - xf
        for b, (lo, hi) in enumerate(PROFILE_BINS):
            sel = (np.abs(d) >= lo) & (np.abs(d) < hi)
            for k in range(7):
                prof[b][k].extend(thick[k, sel])
        far = (np.abs(d) >= 150) & (np.abs(d) < 260)
        if (far & (d < 0)).any() and (far & (d > 0)).any():
            sides.append(sorted([thick[0, far & (d < 0)].mean(), thick[0, far & (d > 0)].mean()]))
        gcl = uniform_filter1d(thick[1], 9)
        ref = gcl[(np.abs(d) >= 80) & (np.abs(d) < 150)].mean()
        half.append(np.mean([np.argmax(gcl[xf::s] >= ref / 2) for s in (1, -1)]))
    return {
        "profile": [[float(np.mean(v)) if v else float("nan") for v in row] for row in prof],
        "temporal_nfl": float(np.mean([s[0] for s in sides])) if sides else float("nan"),
        "nasal_nfl": float(np.mean([s[1] for s in sides])) if sides else float("nan"),
        "off_fovea": np.mean(off, 0).tolist() if off else [],
        "foveal_scans": len(sides),
        "pit_halfwidth": float(np.mean(half)) if half else float("nan"),
    }


def speckle(pairs) -> dict[str, float]:
    """Speckle contrast and grain inside ONL–ISM (raw 5, the most homogeneous layer).

    The residual ``image / local mean − 1`` (local mean: Gaussian σ 4 px) is taken more
    than 2 px from the layer's edges; contrast is its std, grain its correlation with the
    pixel one row below (axial) and one column right (lateral).
    """
    res, ax, lat = [], [], []
    for img, raw in pairs:
        img = img.astype(float)
        inner = raw == 5
        for shift in ((2, 0), (-2, 0), (0, 2), (0, -2)):
            inner &= np.roll(raw == 5, shift, (0, 1))
        r = img / np.maximum(gaussian_filter(img, 4), 1) - 1
        res.append(r[inner])
        for corr, nb in ((ax, np.roll(r, -1, 0)), (lat, np.roll(r, -1, 1))):
            corr.append(np.corrcoef(r[inner], nb[inner])[0, 1])
    return {"contrast": float(np.concatenate(res).std()), "axial_corr": float(np.mean(ax)),
            "lateral_corr": float(np.mean(lat))}


def fluid(pairs) -> dict[str, float]:
    """Edema: share of scans with fluid, cysts (>= 5 px) per such scan, cyst sizes, host layers.

    A cyst's host is the layer most of its upper and lower edge pixels touch; ``hosts``
    is the share of cysts per host label.
    """
    with_fluid, counts, largest, areas, hosts = 0, [], [], [], np.zeros(10)
    for _, raw in pairs:
        lab, n = label(raw == FLUID)
        if not n:
            continue
        with_fluid += 1
        sizes = np.bincount(lab.ravel())[1:]
        counts.append(int((sizes >= 5).sum()))
        largest.append(int(sizes.max()))
        areas.append(float(sizes.sum()))
        for c in np.flatnonzero(sizes >= 5) + 1:
            f = lab == c
            edge = np.concatenate([raw[:-1][f[1:] & ~f[:-1]], raw[1:][f[:-1] & ~f[1:]]])
            hosts[np.bincount(edge[edge != FLUID], minlength=10).argmax()] += 1
    return {"prevalence": with_fluid / len(pairs), "cysts_per_scan": float(np.mean(counts or [0])),
            "largest_cyst_px": float(np.max(largest or [0])), "fluid_px_per_scan": float(np.mean(areas or [0])),
            "hosts": {k: float(hosts[k] / max(hosts.sum(), 1)) for k in range(10) if hosts[k]}}


def depth_profiles(pairs) -> dict:
    """How intensity varies with depth: within NFL, ISE and OS–RPE (relative to the layer's
    mean, in fifths of its thickness, top to bottom) and below Bruch's membrane (grey
    levels in ``CHOROID_BINS`` rows)."""
    inside = {k: [[] for _ in range(5)] for k in (1, 6, 7)}
    chor = [[] for _ in CHOROID_BINS]
    for img, raw in pairs:
        rows = np.arange(raw.shape[0])[:, None]
        ok = img < 255
        for k, bins in inside.items():
            sel = raw == k
            top, bot = np.argmax(sel, 0), raw.shape[0] - np.argmax(sel[::-1], 0)
            rel = np.clip((rows - top) / np.maximum(bot - top, 1), 0, 0.999)
            for b in range(5):
                bins[b].append(img[sel & ok & (rel * 5 // 1 == b)])
        below = rows - (raw.shape[0] - np.argmax(((raw >= 1) & (raw <= 7))[::-1], 0))
        for b, (lo, hi) in enumerate(CHOROID_BINS):
            chor[b].append(img[(raw == 8) & ok & (below >= lo) & (below < hi)])
    out = {}
    for k, bins in inside.items():
        vals = [np.concatenate(b).astype(float) for b in bins]
        mean = np.concatenate(vals).mean()
        out[k] = [float(v.mean() / mean) for v in vals]
    out["choroid"] = [float(np.concatenate(b).mean()) for b in chor]
    return out


def background(pairs) -> dict[str, float]:
    """Vitreous noise floor (mean, std) and the white padding: share of pixels, share of scans."""
    vit = np.concatenate([img[(raw == 0) & (img < 255)] for img, raw in pairs]).astype(float)
    return {"vitreous_mean": float(vit.mean()), "vitreous_std": float(vit.std()),
            "padding_px": float(np.mean([(img == 255).mean() for img, _ in pairs])),
            "padding_top": float(np.mean([(img[:5] == 255).any() for img, _ in pairs])),
            "padding_bottom": float(np.mean([(img[-5:] == 255).any() for img, _ in pairs]))}


def summary(pairs) -> dict:
    """Everything the phantom is fitted to, for one set of scans."""
    geo = [geometry(raw) for _, raw in pairs]
    return {
        "scans": len(pairs),
        "label_means": label_means(pairs),
        "layer_mean_sd_across_scans": np.nanstd(per_scan_layer_means(pairs), 0).tolist(),
        "geometry": {k: {"mean": float(np.mean([g[k] for g in geo])), "sd": float(np.std([g[k] for g in geo])),
                         "min": float(np.min([g[k] for g in geo])), "max": float(np.max([g[k] for g in geo]))}
                     for k in geo[0]},
        "thickness": thickness_profile(pairs),
        "speckle": speckle(pairs),
        "fluid": fluid(pairs),
        "depth_profiles": depth_profiles(pairs),
        "background": background(pairs),
    }


def fit_levels(target: dict[int, float], n: int = 110, rounds: int = 3) -> np.ndarray:
    """The phantom's ``LEVELS`` whose rendered class means match ``target`` (raw label -> mean).

    Blur, speckle, noise floor and gain make the rendered mean a smooth, nearly
    proportional function of each level, so a few multiplicative corrections converge.
    """
    from dpstudy.data import phantom

    levels = phantom.LEVELS.copy()
    for _ in range(rounds):
        got = label_means(phantom.phantom_pairs(n, seed=1000, levels=levels))
        for k, want in target.items():  # the choroid's entry (a gain on its profile) too
            if k in got:
                levels[k] *= want / got[k]
    return np.round(levels, 2)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("data", help="a prepared Duke folder, or 'synthetic[:spec]' for the phantom")
    p.add_argument("--split", default="val", help="Duke split to measure (default val; never fit on train)")
    p.add_argument("--n", type=int, default=66, help="phantom scans to measure")
    p.add_argument("--fit-levels", action="store_true", help="also print LEVELS fitted to these means")
    a = p.parse_args(argv)
    if a.data.startswith("synthetic"):
        from dpstudy.data.phantom import phantom_pairs
        from dpstudy.data.source import parse_synthetic_spec

        dr = parse_synthetic_spec(a.data).dr
        pairs = phantom_pairs(a.n, seed=0, dr=dr)
    else:
        pairs = load_raw_split(a.data, a.split)
    stats = summary(pairs)
    print(json.dumps(stats, indent=1, default=float))
    if a.fit_levels:
        print("LEVELS =", fit_levels(stats["label_means"]).tolist())


if __name__ == "__main__":
    main()
