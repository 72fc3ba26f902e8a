"""Test-time augmentation: a cell's embedding averaged over the dihedral transforms of its crop (``run --tta``).

A cell has no preferred orientation on the slide, but a ViT's embedding changes when its crop is flipped or turned by
90 degrees. Averaging over the group of those transforms gives an embedding that no flip (``flips``: the four
transforms that mirror the axes) or no flip and quarter turn (``d8``: all eight) changes, at 4 or 8 times the model's
cost. The transforms act on the raw crops before any backend sees them, so every backend (PyTorch, ONNX Runtime,
TensorRT, null) runs them the same way; exact on the pixel grid (no interpolation).
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from scdino.engine.config import TTA_MODES
from scdino.errors import ConfigError


def transforms(mode: str) -> list[Callable[[np.ndarray], np.ndarray]]:
    """The transforms of ``mode`` on crops (n, C, S, S), the identity first."""
    if mode not in TTA_MODES:
        raise ConfigError(f"--tta {mode!r}: expected one of {', '.join(TTA_MODES)}")
    if mode == "none":
        return [lambda x: x]
    if mode == "flips":  # mirror x, mirror y, both (a half turn)
        return [lambda x, f=f: np.flip(x, axis=f) if f else x for f in (None, -1, -2, (-2, -1))]
    turns = [lambda x, k=k: np.rot90(x, k, axes=(-2, -1)) for k in range(4)]
    return turns + [lambda x, t=t: np.flip(t(x), axis=-1) for t in turns]


def averaged(crops: np.ndarray, mode: str, embed: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """The mean of ``embed`` over the transforms of ``mode`` (one call per transform, each the size of ``crops``, so a
    backend's batch and memory limits hold as without augmentation)."""
    ts = transforms(mode)
    if len(ts) == 1:
        return embed(crops)
    total = None
    for t in ts:
        e = embed(np.ascontiguousarray(t(crops))).astype(np.float64)
        total = e if total is None else total + e
    return (total / len(ts)).astype(np.float32)
