"""Files shipped inside the package: the trained default model and real nucleus crops for checks.

Only paths and small arrays; nothing is loaded at import time.
"""

from __future__ import annotations

import importlib.resources

import numpy as np


def default_model_path():
    """The trained default model (see the README: how it was trained)."""
    return importlib.resources.files("scdino.data").joinpath("default_model.pth")


def packaged_crops() -> np.ndarray:
    """48 real uint16 neocortex nucleus crops (48, 3, 48, 48): export verification, int8 calibration, tests."""
    with importlib.resources.files("scdino.data").joinpath("verify_crops.npz").open("rb") as f:
        return np.load(f)["crops"]
