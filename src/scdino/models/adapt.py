"""Channel adaptation of an RGB-trained patch embedding to N microscopy channels (SPEC section 2).

``mean`` (the default, and what the scDINO code does): W' = mean(W over R, G, B) repeated N times, no rescaling.
(The paper's methods text also mentions multiplying by N; the published code does not, and neither do we.)
``scaled``: timm's ``adapt_input_conv``: repeat R, G, B cyclically to N channels and multiply by 3/N.
``map:R,G,B,...``: channel i uses the R, G or B filter named at position i.
"""

from __future__ import annotations

import logging

import torch

from scdino.defaults import ADAPT
from scdino.errors import ConfigError

log = logging.getLogger(__name__)

_RGB = {"R": 0, "G": 1, "B": 2}


def parse_mode(mode: str, n: int) -> tuple[str, list[int] | None]:
    """Validate an adaptation mode for ``n`` channels; returns (kind, channel map or None)."""
    if mode in ("mean", "scaled"):
        return mode, None
    if mode.startswith("map:"):
        parts = [p.strip().upper() for p in mode[4:].split(",")]
        if len(parts) != n or any(p not in _RGB for p in parts):
            raise ConfigError(
                f"channel map {mode!r} must name R, G or B once per input channel ({n} channels), e.g. map:"
                + ",".join("RGB"[i % 3] for i in range(n))
            )
        return "map", [_RGB[p] for p in parts]
    raise ConfigError(f"unknown channel adaptation {mode!r}; expected mean, scaled or map:R,G,B,...")


def adapt_patch_weight(weight: torch.Tensor, n: int, mode: str = ADAPT) -> torch.Tensor:
    """Adapt a (D, 3, p, p) patch-embedding weight to (D, n, p, p)."""
    if weight.ndim != 4 or weight.shape[1] != 3:
        raise ConfigError(f"channel adaptation needs an RGB patch embedding (D, 3, p, p), got {tuple(weight.shape)}")
    kind, cmap = parse_mode(mode, n)
    if kind == "mean":
        out = weight.mean(dim=1, keepdim=True).repeat(1, n, 1, 1)
    elif kind == "scaled":
        reps = -(-n // 3)
        out = weight.repeat(1, reps, 1, 1)[:, :n] * (3.0 / n)
    else:
        out = weight[:, cmap]
    log.info("adapted the RGB patch embedding to %d channels (%s)", n, mode)
    return out.contiguous()
