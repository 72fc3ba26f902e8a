"""The hand-crafted morphology baseline (scdino.engine.morphology)."""

import numpy as np

from scdino.engine.morphology import feature_names, morphology_features


def _ellipse(ry: float, rx: float, size: int = 40, level: int = 1000) -> np.ndarray:
    yy, xx = np.mgrid[:size, :size] - (size - 1) / 2
    img = np.full((size, size), 100, np.uint16)
    img[(yy / ry) ** 2 + (xx / rx) ** 2 <= 1] = level
    return img


def test_shape_and_intensity_of_known_objects():
    crops = np.stack([np.stack([_ellipse(8, 8), _ellipse(6, 12)]), np.stack([_ellipse(10, 10), _ellipse(4, 4)])])
    f = morphology_features(crops)
    names = feature_names(["A", "B"])
    assert f.shape == (2, len(names)) and np.isfinite(f).all()
    col = {n: i for i, n in enumerate(names)}
    assert abs(f[0, col["A_area"]] - np.pi * 64) < 0.1 * np.pi * 64  # a disk of radius 8
    assert f[0, col["A_eccentricity"]] < 0.3 < f[0, col["B_eccentricity"]]  # disk round, ellipse not
    assert f[1, col["A_area"]] > f[0, col["A_area"]]
    assert abs(f[0, col["A_mean"]] - 900) < 50  # background-subtracted object intensity
    assert f[0, col["A_mean_outside"]] < 100


def test_a_flat_channel_has_no_object_and_zero_features():
    crops = np.stack([np.stack([np.full((40, 40), 7, np.uint16), _ellipse(8, 8)])])
    f = morphology_features(crops)
    names = feature_names(["flat", "cell"])
    flat = [i for i, n in enumerate(names) if n.startswith("flat_") and "_d" not in n]
    assert np.all(f[0, flat] == 0) and f[0, names.index("cell_area")] > 0
