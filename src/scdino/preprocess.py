"""The one definition of scdino's preprocessing (SPEC section 3), on torch tensors on any device.

1. channels are selected and ordered before this point (by the plate reader);
2. cast to float32, min-max scale each image and each channel separately to [0, 1]; a constant channel
   becomes all zeros, never NaN;
3. bilinear resize to the model's input size;
4. optional per-channel mean/std normalisation (models trained on microscopy store theirs).
"""

from __future__ import annotations

from dataclasses import dataclass, field
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
    """

    input_size: int = 224
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    resize: str = field(default="bilinear")

    def to_dict(self) -> dict:
        return {
            "steps": ["float32", "minmax_per_image_per_channel(constant->0)", f"{self.resize}_resize", "mean_std"],
            "input_size": self.input_size,
            "mean": list(self.mean) if self.mean is not None else None,
            "std": list(self.std) if self.std is not None else None,
            "align_corners": False,
        }


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


def preprocess(
    x: torch.Tensor,
    input_size: int,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> torch.Tensor:
    """Apply SPEC section 3 to raw crops ``x`` of shape (B, C, S, S) of any numeric dtype.

    Returns a float32 tensor (B, C, input_size, input_size) on the device of ``x``.
    """
    if x.ndim != 4:
        raise ValueError(f"expected crops of shape (batch, channels, height, width), got {tuple(x.shape)}")
    y = minmax_scale(x)
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
    return preprocess(x, prep.input_size, prep.mean, prep.std)
