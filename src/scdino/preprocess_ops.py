"""The steps of scdino's preprocessing (SPEC section 3, see :mod:`scdino.preprocess`) on torch tensors, on any
device."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from scdino.preprocess import Preprocessing


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
