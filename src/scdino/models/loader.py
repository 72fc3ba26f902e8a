"""Building a model: :func:`load_model` opens a MODEL spec (through :func:`scdino.models.checkpoint.open_checkpoint`),
adapts its channels, resizes its position embedding once and returns the backbone with its preprocessing. Reached
through the model card (:meth:`scdino.models.card.ModelCard.load`) by everything outside ``scdino.models``."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from scdino.batches import EMBED_BATCH_SIZE
from scdino.errors import CheckpointError, ConfigError
from scdino.models.adapt import adapt_patch_weight, parse_mode
from scdino.models.checkpoint import Checkpoint, open_checkpoint
from scdino.models.checks import check_channels
from scdino.models.vit import VisionTransformer, ViTConfig, arch_config, arch_name, resize_pos_embed
from scdino.preprocess import Preprocessing
from scdino.preprocess_ops import apply

log = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    """A ready-to-run backbone, its preprocessing and a JSON-able description for output metadata."""

    model: VisionTransformer
    prep: Preprocessing
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def channels(self) -> list[str] | None:
        return self.info.get("channels")


def build_model(
    cfg: ViTConfig, state_dict: dict[str, torch.Tensor] | None = None, source: str = ""
) -> VisionTransformer:
    """Build a ViT and load ``state_dict`` strictly (missing or unexpected keys are an error)."""
    model = VisionTransformer(cfg)
    if state_dict is not None:
        result = model.load_state_dict(state_dict, strict=False)
        if result.missing_keys or result.unexpected_keys:
            raise CheckpointError(
                f"{source}: weights do not fit a {arch_name(cfg)} ViT: missing {result.missing_keys[:5]}, "
                f"unexpected {result.unexpected_keys[:5]}; the checkpoint is of another architecture"
            )
    return model.eval()


def _native_channels(ckpt: Checkpoint | None) -> tuple[int | None, list[str] | None]:
    """(channel count, channel names) a model was trained for; (None, None) for RGB and random models, which are
    adapted to any count. Three inputs and nothing saying they are microscopy channels (names or training
    statistics) mark an RGB model."""
    if ckpt is None:
        return None, None
    names = ckpt.meta.get("channels")
    if ckpt.config.in_chans == 3 and names is None and ckpt.meta.get("mean") is None:
        return None, None
    return ckpt.config.in_chans, (list(names) if names is not None else None)


def load_model(
    spec: str,
    n_channels: int | None = None,
    input_size: int | None = None,
    checkpoint_key: str | None = "teacher",
    adapt: str = "mean",
    seed: int = 0,
    *,
    channel_names: Sequence[str] | None = None,
    available: Sequence[str] | None = None,
) -> LoadedModel:
    """Open MODEL ``spec`` for ``n_channels`` input channels at ``input_size``.

    An RGB model (3 input channels and no channel names of its own) is channel-adapted to ``n_channels`` with
    ``adapt`` (see :mod:`scdino.models.adapt`). A model trained on N channels must get exactly N (and, where the run
    names them in ``channel_names``, the same ones: :func:`scdino.models.card.check_channels`); ``n_channels`` None
    means its own count. ``input_size`` None means the size the model was trained at (224 for DINO's and random
    models).
    """
    ckpt = open_checkpoint(spec, checkpoint_key)
    native, trained_on = _native_channels(ckpt)
    if channel_names is not None:
        n_channels = len(channel_names)
    if n_channels is None:
        if native is None:
            raise ConfigError(
                f"{spec}: adapts to any number of channels; say how many with --channels NAMES or --n-channels N"
            )
        n_channels = native
    if n_channels < 1:
        raise ConfigError(f"need at least one channel, got {n_channels}")
    check_channels(spec, native, trained_on, n_channels, channel_names, available)
    if ckpt is None:
        if input_size is None:
            input_size = 224
        model, stats, info = _random_model(spec, n_channels, input_size, seed)
    else:
        if input_size is None:
            input_size = int(ckpt.meta.get("input_size") or ckpt.config.img_size)
        model, stats, info = _checkpoint_model(ckpt, n_channels, adapt, rgb=native is None)
        if trained_on is not None:
            info["channels"] = trained_on
        if input_size % model.cfg.patch_size:
            raise ConfigError(f"--input-size {input_size} is not a multiple of the patch size {model.cfg.patch_size}")
        if input_size != model.cfg.img_size:
            model = _resized(model, input_size)
    cfg = model.cfg
    if input_size % cfg.patch_size:
        raise ConfigError(f"--input-size {input_size} is not a multiple of the patch size {cfg.patch_size}")

    def floats(key):
        return tuple(float(v) for v in stats[key]) if stats.get(key) is not None else None

    prep = Preprocessing(
        input_size, floats("mean"), floats("std"), scale_lo=floats("scale_lo"), scale_hi=floats("scale_hi")
    )
    info = {"model": spec, "untrained": ckpt is None, **info}
    info.update(arch=arch_name(cfg), config=cfg.to_dict(), embed_dim=cfg.embed_dim, input_size=input_size)
    return LoadedModel(model.eval(), prep, info)


def _random_model(spec: str, n_channels: int, input_size: int, seed: int) -> tuple[VisionTransformer, dict, dict]:
    """An untrained ``random:ARCH`` model, seeded; it has no training statistics."""
    torch.manual_seed(seed)
    model = build_model(arch_config(spec.split(":", 1)[1], in_chans=n_channels, img_size=input_size))
    log.debug("model %s is untrained (random weights): its embeddings carry no learned features", spec)
    return model, {}, {"seed": seed, "checkpoint_sha256": None, "layout": None}


def _checkpoint_model(ckpt: Checkpoint, n_channels: int, adapt: str, rgb: bool) -> tuple[VisionTransformer, dict, dict]:
    """The backbone of a checkpoint (an RGB model adapted to ``n_channels``), its training statistics and what is
    known about it."""
    cfg = ckpt.config
    info: dict[str, Any] = {
        "checkpoint_sha256": ckpt.sha256,
        "layout": ckpt.layout,
        "checkpoint_key": ckpt.key,
        "source": ckpt.source,
    }
    if ckpt.meta.get("crop_size"):
        info["crop_size"] = int(ckpt.meta["crop_size"])
    sd = dict(ckpt.state_dict)
    if rgb:  # microscopy channels are not R, G, B: every RGB model is adapted (SPEC section 2)
        parse_mode(adapt, n_channels)
        sd["patch_embed.proj.weight"] = adapt_patch_weight(sd["patch_embed.proj.weight"], n_channels, adapt)
        info["adaptation"] = adapt
        cfg = ViTConfig(**{**cfg.to_dict(), "in_chans": n_channels})
    model = build_model(cfg, sd, ckpt.source)
    stats = {k: ckpt.meta.get(k) for k in ("mean", "std", "scale_lo", "scale_hi")}
    for name in ("scale_lo", "scale_hi"):
        if stats[name] is not None and len(stats[name]) != n_channels:
            raise ConfigError(f"{ckpt.source}: {name} has {len(stats[name])} values for {n_channels} channels")
    if (stats["scale_lo"] is None) != (stats["scale_hi"] is None):
        raise ConfigError(f"{ckpt.source}: the checkpoint has only one of scale_lo and scale_hi")
    return model, stats, info


def _resized(model: VisionTransformer, input_size: int) -> VisionTransformer:
    """The same model for ``input_size`` inputs, its position embedding interpolated once (SPEC section 2)."""
    new = ViTConfig(**{**model.cfg.to_dict(), "img_size": input_size})
    resized = VisionTransformer(new)
    sd = model.state_dict()
    sd["pos_embed"] = resize_pos_embed(sd["pos_embed"], input_size // model.cfg.patch_size)
    resized.load_state_dict(sd)
    log.info("position embedding interpolated once for %dx%d inputs", input_size, input_size)
    return resized.eval()


def embed_crops(
    net: nn.Module, raw, prep: Preprocessing, device=None, batch_size: int = EMBED_BATCH_SIZE
) -> np.ndarray:
    """CLS embeddings (n, D) float32 of raw crops (n, C, S, S; numpy or tensor, any dtype) through ``net`` with the
    preprocessing ``prep``, in batches, on ``device`` (default: where ``net`` is)."""
    device = device or next(net.parameters()).device
    raw = torch.as_tensor(raw) if not isinstance(raw, torch.Tensor) else raw
    net.eval()
    out = []
    with torch.inference_mode():
        for a in range(0, len(raw), batch_size):
            out.append(net(apply(raw[a : a + batch_size].to(device), prep)).float().cpu())
    return torch.cat(out).numpy() if out else np.zeros((0, net.cfg.embed_dim), np.float32)
