"""ViT models: the model card (:mod:`~scdino.models.card`, what a MODEL is, read once), architectures, checkpoint I/O,
channel adaptation, and building a model (:mod:`~scdino.models.loader`).

A MODEL string is one of

* a path to a checkpoint (DINO full checkpoint, backbone-only file, scDINO or scdino-train checkpoint),
* a hub name (``dino_vits16``, ``dino_vits8``, ``dino_vitb16``, ``dino_vitb8``), downloaded once into the cache,
* ``random:ARCH`` (e.g. ``random:vit_small16``): an untrained model for plumbing and benchmarks; outputs say so,
* an exported ``model.onnx`` or a TensorRT ``model.plan`` with its sidecar.

Importing this package does not import torch (a run on ONNX Runtime never needs it): the names that build or hold
torch modules are imported from their submodules on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

from scdino.models.arch import ViTConfig, arch_config, arch_name
from scdino.models.card import ModelCard, describe_model
from scdino.models.checkpoint import HUB_URLS, Checkpoint, forget_checkpoints, open_checkpoint, read_checkpoint

#: names that need torch -> the submodule that defines them
_LAZY = {
    "LoadedModel": "loader",
    "build_model": "loader",
    "embed_crops": "loader",
    "load_model": "loader",
    "VisionTransformer": "vit",
    "resize_pos_embed": "vit",
    "adapt_patch_weight": "adapt",
}

__all__ = [
    "HUB_URLS",
    "Checkpoint",
    "ModelCard",
    "ViTConfig",
    "arch_config",
    "arch_name",
    "describe_model",
    "forget_checkpoints",
    "open_checkpoint",
    "read_checkpoint",
    *_LAZY,
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f"scdino.models.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
