"""A compact DINO-faithful Vision Transformer.

The module tree and parameter names are those of DINO's ``vision_transformer.py`` (and of timm's
``VisionTransformer``): ``cls_token``, ``pos_embed``, ``patch_embed.proj``, ``blocks.N.{norm1,attn.qkv,attn.proj,
norm2,mlp.fc1,mlp.fc2}``, ``norm``; so DINO, scDINO and timm state dicts load without renaming. Attention uses
PyTorch's fused ``scaled_dot_product_attention``; ``get_last_selfattention`` computes the weights explicitly.

For inference the position embedding is resized once, when the model is built for an input size
(:func:`resize_pos_embed`); only training's smaller local crops interpolate it in the forward pass, as DINO does
(:func:`interpolate_pos_encoding`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from scdino.models.arch import FAMILIES, ViTConfig, arch_config, arch_name

__all__ = [
    "FAMILIES",
    "ViTConfig",
    "VisionTransformer",
    "arch_config",
    "arch_name",
    "interpolate_pos_encoding",
    "resize_pos_embed",
]


class DropPath(nn.Module):
    """Stochastic depth per sample (identity at inference)."""

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def _qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        return qkv[0], qkv[1], qkv[2]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self._qkv(x)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))

    def forward_with_weights(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Output and softmax attention weights in one pass (explicit attention, for attention maps)."""
        b, n, c = x.shape
        q, k, v = self._qkv(x)
        a = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)
        return self.proj((a @ v).transpose(1, 2).reshape(b, n, c)), a

    def attention_weights(self, x: torch.Tensor) -> torch.Tensor:
        """Softmax attention (batch, heads, tokens, tokens), as DINO's ``get_last_selfattention`` returns it."""
        q, k, _ = self._qkv(x)
        return ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)


class Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, qkv_bias: bool, drop_path: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, qkv_bias)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class VisionTransformer(nn.Module):
    """DINO's ViT; ``forward`` returns the CLS token after the final LayerNorm (the cell embedding)."""

    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d = cfg.embed_dim
        self.patch_embed = PatchEmbed(cfg.patch_size, cfg.in_chans, d)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.grid * cfg.grid + 1, d))
        rates = torch.linspace(0, cfg.drop_path_rate, cfg.depth).tolist()
        self.blocks = nn.ModuleList(Block(d, cfg.num_heads, cfg.mlp_ratio, cfg.qkv_bias, r) for r in rates)
        self.norm = nn.LayerNorm(d, eps=1e-6)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        self.apply(_init_weights)
        #: training: keep only each block's input for the backward pass and recompute the block there (activation
        #: checkpointing; the same loss and gradients, about a third more compute, a fraction of the memory)
        self.checkpoint_blocks = False

    @property
    def embed_dim(self) -> int:
        return self.cfg.embed_dim

    def prepare_tokens(self, x: torch.Tensor, interpolate: bool = False) -> torch.Tensor:
        """Patch tokens + CLS + position embedding. Inputs must have the built size unless ``interpolate`` (training's
        local crops), which resizes the position embedding for this call exactly as DINO's training does
        (:func:`interpolate_pos_encoding`)."""
        pos = self.pos_embed
        if x.shape[-1] != self.cfg.img_size or x.shape[-2] != self.cfg.img_size:
            if not interpolate or x.shape[-1] != x.shape[-2]:
                raise ValueError(
                    f"model built for {self.cfg.img_size}x{self.cfg.img_size} inputs, got {tuple(x.shape[-2:])}; "
                    "resize in preprocessing or rebuild the model for this input size"
                )
            pos = interpolate_pos_encoding(self.pos_embed, x.shape[-1] // self.cfg.patch_size)
        x = self.patch_embed(x)
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        return torch.cat((cls, x), dim=1) + pos

    def forward_tokens(self, x: torch.Tensor, interpolate: bool = False) -> torch.Tensor:
        x = self.prepare_tokens(x, interpolate)
        recompute = self.checkpoint_blocks and torch.is_grad_enabled()
        for blk in self.blocks:
            # the random state is replayed in the recomputation, so drop path drops the same paths twice
            x = torch.utils.checkpoint.checkpoint(blk, x, use_reentrant=False) if recompute else blk(x)
        return self.norm(x)

    def forward(self, x: torch.Tensor, interpolate: bool = False) -> torch.Tensor:
        return self.forward_tokens(x, interpolate)[:, 0]

    def forward_with_attention(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """CLS token and the last block's CLS-to-patch attention (batch, heads, patches), in one pass."""
        x = self.prepare_tokens(x)
        for blk in self.blocks[:-1]:
            x = blk(x)
        last = self.blocks[-1]
        out, a = last.attn.forward_with_weights(last.norm1(x))
        x = x + out
        x = x + last.mlp(last.norm2(x))
        return self.norm(x)[:, 0], a[:, :, 0, 1:]

    def get_last_selfattention(self, x: torch.Tensor) -> torch.Tensor:
        """Attention weights of the last block (batch, heads, tokens, tokens)."""
        x = self.prepare_tokens(x)
        for blk in self.blocks[:-1]:
            x = blk(x)
        return self.blocks[-1].attn.attention_weights(self.blocks[-1].norm1(x))


def _init_weights(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


def resize_pos_embed(pos_embed: torch.Tensor, new_grid: int) -> torch.Tensor:
    """Bicubically resize a (1, 1 + g*g, D) position embedding to a ``new_grid`` x ``new_grid`` patch grid.

    Done once when a model is built for an input size other than the one it was trained at (resized to the target
    size; DINO's training interpolates by a scale factor instead: :func:`interpolate_pos_encoding`).
    """
    n = pos_embed.shape[1] - 1
    old = int(math.isqrt(n))
    if old * old != n:
        raise ValueError(f"position embedding of {n} patches is not a square grid")
    if old == new_grid:
        return pos_embed
    cls, patches = pos_embed[:, :1], pos_embed[:, 1:]
    d = pos_embed.shape[-1]
    grid = patches.reshape(1, old, old, d).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=(new_grid, new_grid), mode="bicubic", align_corners=False)
    patches = grid.permute(0, 2, 3, 1).reshape(1, new_grid * new_grid, d).to(pos_embed.dtype)
    return torch.cat((cls, patches), dim=1)


def interpolate_pos_encoding(pos_embed: torch.Tensor, new_grid: int) -> torch.Tensor:
    """The position embedding for a ``new_grid`` x ``new_grid`` patch grid as DINO's ``interpolate_pos_encoding`` makes
    it during training (the local crops): bicubic, by the scale factor ``(new_grid + 0.1) / old_grid``. That factor
    also sets where the output samples fall, so the result differs slightly from resizing to a target size
    (:func:`resize_pos_embed`, used once when a model is built for another input size)."""
    n = pos_embed.shape[1] - 1
    old = int(math.isqrt(n))
    if old == new_grid:
        return pos_embed
    cls, patches = pos_embed[:, :1], pos_embed[:, 1:]
    d = pos_embed.shape[-1]
    f = (new_grid + 0.1) / math.sqrt(n)
    grid = patches.reshape(1, old, old, d).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, scale_factor=(f, f), mode="bicubic")
    if grid.shape[-1] != new_grid or grid.shape[-2] != new_grid:
        raise ValueError(f"position embedding of a {old}x{old} grid cannot be interpolated to {new_grid}x{new_grid}")
    patches = grid.permute(0, 2, 3, 1).reshape(1, new_grid * new_grid, d)
    return torch.cat((cls, patches), dim=1)
