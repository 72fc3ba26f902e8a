"""Files shipped inside the package: the trained default model (``--model default``) and real nucleus crops for checks.

Only paths and small arrays; nothing is loaded at import time.
"""

from __future__ import annotations

import importlib.resources

import numpy as np

#: trained models shipped in the package, by the name ``--model`` takes (the README says how each was trained)
PACKAGED_MODELS = {
    "default": "default_model.pth",  # neocortex nuclei, CTIP2/BRN2/ROR (the sample plate)
}

#: models that were shipped once and are withdrawn, with the reason ``--model NAME`` gives
WITHDRAWN_MODELS = {
    "ifc-cellcycle": (
        "the label-free cell-cycle model was withdrawn: on held-out Jurkat cells it was no better than an untrained "
        "network (see the README, 'Training on the Jurkat cells'); train your own with scdino-train and pass its "
        "checkpoint with --model"
    ),
}


def packaged_model_path(name: str):
    """The file of the packaged model ``name`` (a key of :data:`PACKAGED_MODELS`)."""
    return importlib.resources.files("scdino.data").joinpath(PACKAGED_MODELS[name])


def default_model_path():
    """The trained default model (see the README: how it was trained)."""
    return packaged_model_path("default")


def packaged_crops() -> np.ndarray:
    """48 real uint16 neocortex nucleus crops (48, 3, 48, 48): export verification, int8 calibration, tests."""
    with importlib.resources.files("scdino.data").joinpath("verify_crops.npz").open("rb") as f:
        return np.load(f)["crops"]
