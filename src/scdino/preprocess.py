"""The one definition of scdino's preprocessing (SPEC section 3), on torch tensors on any device.

1. channels are selected and ordered before this point (by the plate reader);
2. cast to float32, min-max scale each image and each channel separately to [0, 1]; a constant channel
   becomes all zeros, never NaN. Or, for models trained with ``intensity_scaling=dataset``, scale each channel by a
   fixed range measured on the training crops (stored with the model) and clip to [0, 1]: absolute marker levels,
   which per-crop min-max scaling discards, are kept;
3. bilinear resize to the model's input size;
4. optional per-channel mean/std normalisation (models trained on microscopy store theirs).

This module holds the settings (:class:`Preprocessing`), which cards, sidecars and outputs carry without torch; the
steps on tensors are in :mod:`scdino.preprocess_ops` and reachable here by name (``from scdino.preprocess import
apply``), imported on first use so that a run on ONNX Runtime never imports torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Sequence

import numpy as np

from scdino.defaults import INPUT_SIZE


@dataclass(frozen=True)
class Preprocessing:
    """What the model expects of its input; stored with every output.

    Parameters
    ----------
    input_size
        Side of the square model input in pixels (224 in the paper).
    mean, std
        Per-channel normalisation applied after min-max scaling and resize, or ``None`` for none
        (ImageNet-adapted DINO models use none).
    scale_lo, scale_hi
        Fixed per-channel intensity range (raw pixel units) mapped to [0, 1] and clipped, instead of each crop's own
        minimum and maximum; ``None`` (the paper's per-crop min-max) unless the model was trained so.
    """

    input_size: int = INPUT_SIZE
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    resize: str = field(default="bilinear")
    scale_lo: tuple[float, ...] | None = None
    scale_hi: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        if (self.scale_lo is None) != (self.scale_hi is None):
            raise ValueError("scale_lo and scale_hi go together")

    @property
    def scaling(self) -> str:
        return "minmax" if self.scale_lo is None else "fixed"

    def to_dict(self) -> dict:
        scale = (
            "minmax_per_image_per_channel(constant->0)"
            if self.scale_lo is None
            else "fixed_range_per_channel(scale_lo..scale_hi->0..1, clipped)"
        )
        d = {
            "steps": ["float32", scale, f"{self.resize}_resize", "mean_std"],
            "input_size": self.input_size,
            "mean": list(self.mean) if self.mean is not None else None,
            "std": list(self.std) if self.std is not None else None,
            "align_corners": False,
        }
        if self.scale_lo is not None:
            d.update(scale_lo=list(self.scale_lo), scale_hi=list(self.scale_hi))
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Preprocessing":
        """The inverse of :meth:`to_dict` (as stored in export sidecars and run outputs)."""

        def tup(key):
            return tuple(float(v) for v in d[key]) if d.get(key) is not None else None

        return cls(int(d["input_size"]), tup("mean"), tup("std"), scale_lo=tup("scale_lo"), scale_hi=tup("scale_hi"))

    def select(self, idx: Sequence[int]) -> "Preprocessing":
        """The same preprocessing for the channels ``idx`` (in that order) of the model's channels."""

        def pick(v):
            return tuple(v[i] for i in idx) if v is not None else None

        return replace(
            self, mean=pick(self.mean), std=pick(self.std), scale_lo=pick(self.scale_lo), scale_hi=pick(self.scale_hi)
        )


def intensity_range_warnings(
    crops, scale_lo: Sequence[float], scale_hi: Sequence[float], channels: Sequence[str], where: str = "the data"
) -> list[str]:
    """Warnings when raw crops (n, C, S, S) do not fit a model's fixed intensity range: most pixels in the bottom 5%
    of the range (a dimmer instrument, another bit depth) or more than 10% of them clipped at the top."""
    x = np.asarray(crops)
    out = []
    for c, (lo, hi, name) in enumerate(zip(scale_lo, scale_hi, channels)):
        if hi <= lo or x.size == 0:
            continue
        px = x[:, c].astype(np.float64).ravel()
        p99 = float(np.percentile(px, 99))
        clipped = float(np.mean(px >= hi))
        if p99 < lo + 0.05 * (hi - lo):
            out.append(
                f"{where}, channel {name}: 99% of pixels are below {p99:g}, within the bottom 5% of the model's fixed "
                f"intensity range {lo:g}..{hi:g}; the model was trained on brighter images (another instrument, bit "
                "depth or exposure?), so this channel will carry little signal. Train on this plate, or use a model "
                "with per-crop min-max scaling"
            )
        elif clipped > 0.10:
            out.append(
                f"{where}, channel {name}: {100 * clipped:.0f}% of pixels are at or above the model's upper bound "
                f"{hi:g} and are clipped; the model was trained on dimmer images. Train on this plate, or use a model "
                "with per-crop min-max scaling"
            )
    return out


#: the steps on tensors, defined in :mod:`scdino.preprocess_ops`
OPS = ("minmax_scale", "fixed_scale", "scale_intensity", "preprocess", "apply")


def __getattr__(name: str) -> Any:
    if name in OPS:
        from scdino import preprocess_ops

        return getattr(preprocess_ops, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
