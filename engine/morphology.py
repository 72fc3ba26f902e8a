"""Hand-crafted single-cell features of the kind CellProfiler measures, from scikit-image: the baseline a learned
embedding has to beat on centred single-cell crops.

Per crop and channel: the object is the connected region, nearest the crop centre, of the pixels that differ from the
crop's background (the median of its border) by more than an Otsu threshold of that difference (after a light gaussian
smoothing), holes filled. Then

- shape (``regionprops``): area, perimeter, eccentricity, solidity, extent, major and minor axis, the seven Hu moments;
- intensity inside the object, of the background-subtracted channel: mean, sd, integrated, 10/50/90th percentiles,
  maximum; and the same mean outside it;
- texture (grey-level co-occurrence of the crop quantised to 32 levels between its own min and max, distances 1 and 2,
  averaged over four angles): contrast, dissimilarity, homogeneity, energy, correlation.

A channel with no object (flat, or nothing above the threshold) gets zeros for its shape and object intensities. The
features are raw; standardise them (with statistics of the reference cells) before a distance-based classifier.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

SHAPE = ("area", "perimeter", "eccentricity", "solidity", "extent", "major_axis", "minor_axis") + tuple(
    f"hu{i}" for i in range(7)
)
INTENSITY = ("mean", "sd", "integrated", "p10", "p50", "p90", "max", "mean_outside")
TEXTURE = tuple(
    f"{p}_d{d}" for d in (1, 2) for p in ("contrast", "dissimilarity", "homogeneity", "energy", "correlation")
)
GLCM_LEVELS = 32


def feature_names(channels: Sequence[str]) -> list[str]:
    return [f"{c}_{f}" for c in channels for f in SHAPE + INTENSITY + TEXTURE]


def _object_mask(img: np.ndarray) -> np.ndarray:
    from scipy import ndimage
    from skimage.filters import threshold_otsu

    border = np.concatenate([img[0], img[-1], img[1:-1, 0], img[1:-1, -1]])
    diff = np.abs(ndimage.gaussian_filter(img, 1.0) - np.median(border))
    if not np.ptp(diff) > 0:
        return np.zeros(img.shape, bool)
    labels, n = ndimage.label(diff > threshold_otsu(diff))
    if n == 0:
        return np.zeros(img.shape, bool)
    cy, cx = (np.asarray(img.shape) - 1) / 2
    yy, xx = np.indices(img.shape)
    dist = ndimage.minimum(np.hypot(yy - cy, xx - cx), labels, index=np.arange(1, n + 1))
    return ndimage.binary_fill_holes(labels == 1 + int(np.argmin(dist)))


def _channel_features(img: np.ndarray) -> list[float]:
    from skimage.feature import graycomatrix, graycoprops
    from skimage.measure import regionprops

    img = img.astype(np.float64)
    mask = _object_mask(img)
    border = np.concatenate([img[0], img[-1], img[1:-1, 0], img[1:-1, -1]])
    sub = img - np.median(border)
    if mask.any():
        p = regionprops(mask.astype(np.uint8))[0]
        shape = [
            p.area,
            p.perimeter,
            p.eccentricity,
            p.solidity,
            p.extent,
            p.axis_major_length,
            p.axis_minor_length,
        ] + list(p.moments_hu)
        inside = sub[mask]
        intensity = [inside.mean(), inside.std(), inside.sum(), *np.percentile(inside, (10, 50, 90)), inside.max()]
    else:
        shape = [0.0] * len(SHAPE)
        intensity = [0.0] * 7
    intensity.append(float(sub[~mask].mean()) if (~mask).any() else 0.0)
    lo, hi = img.min(), img.max()
    q = np.zeros(img.shape, np.uint8) if hi <= lo else ((img - lo) / (hi - lo) * (GLCM_LEVELS - 1)).round()
    glcm = graycomatrix(
        q.astype(np.uint8), [1, 2], [0, np.pi / 4, np.pi / 2, 3 * np.pi / 4], GLCM_LEVELS, symmetric=True, normed=True
    )
    texture = [
        float(graycoprops(glcm, prop)[d].mean())
        for d in range(2)
        for prop in ("contrast", "dissimilarity", "homogeneity", "energy", "correlation")
    ]
    return [float(v) for v in shape + intensity + texture]


def morphology_features(crops: np.ndarray) -> np.ndarray:
    """(n, C, S, S) raw crops -> (n, C x 37) float64 features, channel by channel in :func:`feature_names` order."""
    crops = np.asarray(crops)
    if crops.ndim != 4:
        raise ValueError(f"crops of shape {crops.shape}; expected (cells, channels, y, x)")
    out = np.array([[v for ch in cell for v in _channel_features(ch)] for cell in crops], np.float64)
    return np.nan_to_num(out.reshape(len(crops), -1), nan=0.0, posinf=0.0, neginf=0.0)
