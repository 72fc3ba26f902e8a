"""Architectures by name: a ViT's shape (:class:`ViTConfig`), the families scdino knows and their names
(``vit_small16``). Plain data, no torch: a card describes a model with it before any model is built."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

from scdino.defaults import INPUT_SIZE
from scdino.errors import ConfigError


@dataclass(frozen=True)
class ViTConfig:
    """Architecture of a ViT. ``img_size`` is the input size the position embedding is laid out for."""

    embed_dim: int
    depth: int
    num_heads: int
    patch_size: int
    in_chans: int = 3
    img_size: int = INPUT_SIZE
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    drop_path_rate: float = 0.0

    @property
    def grid(self) -> int:
        return self.img_size // self.patch_size

    def to_dict(self) -> dict:
        return asdict(self)


#: family -> (embed_dim, depth, num_heads); DINO's ViTs (SPEC section 2) plus small variants.
FAMILIES: dict[str, tuple[int, int, int]] = {
    "vit_test": (32, 2, 2),  # for unit tests only
    "vit_tiny": (192, 12, 3),
    "vit_small": (384, 12, 6),
    "vit_base": (768, 12, 12),
}

_ARCH_RE = re.compile(r"^(vit_[a-z]+?)(\d+)$")


def arch_config(arch: str, in_chans: int = 3, img_size: int = INPUT_SIZE, drop_path_rate: float = 0.0) -> ViTConfig:
    """Config of a named architecture such as ``vit_small16`` (family + patch size)."""
    m = _ARCH_RE.match(arch)
    if not m or m.group(1) not in FAMILIES:
        known = ", ".join(f"{f}{p}" for f in FAMILIES for p in (16, 8))
        raise ConfigError(f"unknown architecture {arch!r}; expected one of {known}")
    embed_dim, depth, heads = FAMILIES[m.group(1)]
    return ViTConfig(embed_dim, depth, heads, int(m.group(2)), in_chans, img_size, drop_path_rate=drop_path_rate)


def arch_name(cfg: ViTConfig) -> str:
    """Inverse of :func:`arch_config` where the family is known, else a descriptive name."""
    for fam, (d, depth, h) in FAMILIES.items():
        if (d, depth, h) == (cfg.embed_dim, cfg.depth, cfg.num_heads):
            return f"{fam}{cfg.patch_size}"
    return f"vit_d{cfg.embed_dim}_l{cfg.depth}_h{cfg.num_heads}_p{cfg.patch_size}"
