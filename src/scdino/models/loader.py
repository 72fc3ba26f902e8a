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
from scdino.defaults import ADAPT, CHECKPOINT_KEY, INPUT_SIZE
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


@dataclass
class ModelPlan:
    """Everything about a model that its checkpoint says, checked, before a network is built: the config it is built
    with (channels adapted, input size), its preprocessing and its description. A model card is made from a plan
    (no network built); :func:`build` builds it."""

    spec: str
    ckpt: Checkpoint | None
    cfg: ViTConfig
    prep: Preprocessing
    info: dict[str, Any]
    adapt: str
    seed: int
    #: an RGB model adapted to the run's channels
    rgb: bool


def plan_model(
    spec: str,
    n_channels: int | None = None,
    input_size: int | None = None,
    checkpoint_key: str | None = CHECKPOINT_KEY,
    adapt: str = ADAPT,
    seed: int = 0,
    *,
    channel_names: Sequence[str] | None = None,
    available: Sequence[str] | None = None,
) -> ModelPlan:
    """The plan of MODEL ``spec`` for ``n_channels`` input channels at ``input_size`` (see :func:`load_model`): the
    checkpoint read and every check made, no network built."""
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
        size = INPUT_SIZE if input_size is None else input_size
        cfg = arch_config(spec.split(":", 1)[1], in_chans=n_channels, img_size=size)
        stats: dict = {}
        info: dict[str, Any] = {"seed": seed, "checkpoint_sha256": None, "layout": None}
    else:
        size = int(ckpt.meta.get("input_size") or ckpt.config.img_size) if input_size is None else input_size
        cfg, stats, info = _checkpoint_plan(ckpt, n_channels, adapt, rgb=native is None)
        if trained_on is not None:
            info["channels"] = trained_on
        cfg = ViTConfig(**{**cfg.to_dict(), "img_size": size})
    if size % cfg.patch_size:
        raise ConfigError(f"--input-size {size} is not a multiple of the patch size {cfg.patch_size}")

    def floats(key):
        return tuple(float(v) for v in stats[key]) if stats.get(key) is not None else None

    prep = Preprocessing(size, floats("mean"), floats("std"), scale_lo=floats("scale_lo"), scale_hi=floats("scale_hi"))
    info = {"model": spec, "untrained": ckpt is None, **info}
    info.update(arch=arch_name(cfg), config=cfg.to_dict(), embed_dim=cfg.embed_dim, input_size=size)
    return ModelPlan(spec, ckpt, cfg, prep, info, adapt, seed, rgb=native is None)


def build(plan: ModelPlan) -> LoadedModel:
    """The network of ``plan``, built once: an untrained one seeded, a checkpoint's with its weights (an RGB model's
    patch embedding adapted, the position embedding resized to the input size) loaded strictly."""
    if plan.ckpt is None:
        torch.manual_seed(plan.seed)
        log.debug("model %s is untrained (random weights): its embeddings carry no learned features", plan.spec)
        return LoadedModel(build_model(plan.cfg).eval(), plan.prep, dict(plan.info))
    return LoadedModel(build_model(plan.cfg, plan_weights(plan), plan.ckpt.source).eval(), plan.prep, dict(plan.info))


def plan_weights(plan: ModelPlan) -> dict[str, torch.Tensor]:
    """The weights a checkpoint's network is built with for ``plan``: an RGB model's patch embedding adapted to the
    run's channels, the position embedding resized once to the input size (SPEC section 2)."""
    if plan.ckpt is None:
        raise ConfigError(f"{plan.spec}: an untrained model has no weights; pass a checkpoint")
    sd = dict(plan.ckpt.state_dict)
    if plan.rgb:  # microscopy channels are not R, G, B: every RGB model is adapted (SPEC section 2)
        sd["patch_embed.proj.weight"] = adapt_patch_weight(sd["patch_embed.proj.weight"], plan.cfg.in_chans, plan.adapt)
    grid = plan.cfg.img_size // plan.cfg.patch_size
    if "pos_embed" in sd and sd["pos_embed"].shape[1] != grid * grid + 1:
        sd["pos_embed"] = resize_pos_embed(sd["pos_embed"], grid)
        log.info("position embedding interpolated once for %dx%d inputs", plan.cfg.img_size, plan.cfg.img_size)
    return sd


def load_model(
    spec: str,
    n_channels: int | None = None,
    input_size: int | None = None,
    checkpoint_key: str | None = CHECKPOINT_KEY,
    adapt: str = ADAPT,
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
    return build(
        plan_model(spec, n_channels, input_size, checkpoint_key, adapt, seed, channel_names=channel_names,
                   available=available)
    )  # fmt: skip


def _checkpoint_plan(ckpt: Checkpoint, n_channels: int, adapt: str, rgb: bool) -> tuple[ViTConfig, dict, dict]:
    """The config of a checkpoint's backbone (an RGB model's adapted to ``n_channels``), its training statistics and
    what is known about it."""
    cfg = ckpt.config
    info: dict[str, Any] = {
        "checkpoint_sha256": ckpt.sha256,
        "layout": ckpt.layout,
        "checkpoint_key": ckpt.key,
        "source": ckpt.source,
    }
    if ckpt.meta.get("crop_size"):
        info["crop_size"] = int(ckpt.meta["crop_size"])
    if rgb:
        parse_mode(adapt, n_channels)
        info["adaptation"] = adapt
        cfg = ViTConfig(**{**cfg.to_dict(), "in_chans": n_channels})
    stats = {k: ckpt.meta.get(k) for k in ("mean", "std", "scale_lo", "scale_hi")}
    for name in ("scale_lo", "scale_hi"):
        if stats[name] is not None and len(stats[name]) != n_channels:
            raise ConfigError(f"{ckpt.source}: {name} has {len(stats[name])} values for {n_channels} channels")
    if (stats["scale_lo"] is None) != (stats["scale_hi"] is None):
        raise ConfigError(f"{ckpt.source}: the checkpoint has only one of scale_lo and scale_hi")
    return cfg, stats, info


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
