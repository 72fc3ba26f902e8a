"""Crops from a file, for verification and calibration (``--verify-crops``, ``--calibration``)."""

from __future__ import annotations

import numpy as np

from scdino.errors import InputError


def load_crops(path: str | None) -> np.ndarray | None:
    """Crops from a .npy / .npz (key ``crops``) file, or None for the packaged real crops."""
    if path is None:
        return None
    try:
        data = np.load(path)
    except (OSError, ValueError) as exc:
        raise InputError(
            f"{path}: cannot read crops ({exc}); expected a .npy array (n, C, S, S) or .npz with 'crops'"
        ) from exc
    crops = data["crops"] if hasattr(data, "files") else data
    if crops.ndim != 4:
        raise InputError(f"{path}: crops of shape {crops.shape}; expected (n, C, S, S)")
    return crops
