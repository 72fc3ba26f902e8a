"""The one definition of scdino's preprocessing (SPEC section 3), on torch tensors on any device.

1. channels are selected and ordered before this point (by the plate reader);
2. cast to float32, min-max scale each image and each channel separately to [0, 1]; a constant channel
   becomes all zeros, never NaN. Or, for models trained with ``intensity_scaling=dataset``, scale each channel by a
   fixed range measured on the training crops (stored with the model) and clip to [0, 1]: absolute marker levels,
   which per-crop min-max scaling discards, are kept;
3. bilinear resize to the model's input size;
4. optional per-channel mean/std normalisation (models trained on microscopy store theirs).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Sequence

import torch
import torch.nn.functional as F


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

    input_size: int = 224
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


def minmax_scale(x: torch.Tensor) -> torch.Tensor:
    """Scale each image and channel of ``x`` (B, C, H, W) to [0, 1] in float32; constant channels become 0."""
    x = x.to(torch.float32)
    flat = x.flatten(2)
    lo = flat.amin(dim=2, keepdim=True)
    hi = flat.amax(dim=2, keepdim=True)
    span = hi - lo
    # where the channel is constant, divide by 1 and multiply by 0: no NaN, no branch on the device
    scale = torch.where(span > 0, 1.0 / torch.where(span > 0, span, torch.ones_like(span)), torch.zeros_like(span))
    return ((flat - lo) * scale).view_as(x)


def fixed_scale(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """Map each channel's fixed range ``lo``..``hi`` (shape (C,) or broadcastable) to [0, 1] and clip; a channel with
    ``hi <= lo`` becomes 0."""
    x = x.to(torch.float32)
    lo = lo.to(torch.float32).reshape(1, -1, 1, 1)
    span = hi.to(torch.float32).reshape(1, -1, 1, 1) - lo
    scale = torch.where(span > 0, 1.0 / torch.where(span > 0, span, torch.ones_like(span)), torch.zeros_like(span))
    return ((x - lo) * scale).clamp(0.0, 1.0)


def scale_intensity(
    x: torch.Tensor, lo: Sequence[float] | torch.Tensor | None = None, hi: Sequence[float] | torch.Tensor | None = None
) -> torch.Tensor:
    """Step 2 of SPEC section 3: per-crop min-max (``lo``/``hi`` None) or a fixed per-channel range."""
    if lo is None and hi is None:
        return minmax_scale(x)
    if lo is None or hi is None or len(lo) != x.shape[1] or len(hi) != x.shape[1]:
        raise ValueError(f"a fixed intensity range needs lo and hi for each of {x.shape[1]} channels, got {lo}, {hi}")
    return fixed_scale(x, torch.as_tensor(lo, device=x.device), torch.as_tensor(hi, device=x.device))


def preprocess(
    x: torch.Tensor,
    input_size: int,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    scale_lo: Sequence[float] | None = None,
    scale_hi: Sequence[float] | None = None,
) -> torch.Tensor:
    """Apply SPEC section 3 to raw crops ``x`` of shape (B, C, S, S) of any numeric dtype.

    Returns a float32 tensor (B, C, input_size, input_size) on the device of ``x``.
    """
    if x.ndim != 4:
        raise ValueError(f"expected crops of shape (batch, channels, height, width), got {tuple(x.shape)}")
    y = scale_intensity(x, scale_lo, scale_hi)
    if y.shape[-2:] != (input_size, input_size):
        y = F.interpolate(y, size=(input_size, input_size), mode="bilinear", align_corners=False, antialias=False)
    if mean is not None or std is not None:
        if mean is None or std is None or len(mean) != y.shape[1] or len(std) != y.shape[1]:
            raise ValueError(f"mean and std need one value per channel ({y.shape[1]}), got {mean} and {std}")
        m = torch.as_tensor(mean, dtype=torch.float32, device=y.device).view(1, -1, 1, 1)
        s = torch.as_tensor(std, dtype=torch.float32, device=y.device).view(1, -1, 1, 1)
        y = (y - m) / s
    return y


def apply(x: torch.Tensor, prep: Preprocessing) -> torch.Tensor:
    """:func:`preprocess` with the settings of ``prep``."""
    return preprocess(x, prep.input_size, prep.mean, prep.std, prep.scale_lo, prep.scale_hi)


def intensity_range_warnings(
    crops, scale_lo: Sequence[float], scale_hi: Sequence[float], channels: Sequence[str], where: str = "the data"
) -> list[str]:
    """Warnings when raw crops (n, C, S, S) do not fit a model's fixed intensity range: most pixels in the bottom 5%
    of the range (a dimmer instrument, another bit depth) or more than 10% of them clipped at the top."""
    import numpy as np

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
