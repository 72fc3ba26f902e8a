"""A compact model file from a training checkpoint (what ships as scdino's default model)."""

from __future__ import annotations

import os

import torch

from scdino.defaults import CHECKPOINT_KEY
from scdino.models.checkpoint import compact_backbone
from scdino.outputs import claim_file


def _packaged(path) -> bool:
    """Whether ``path`` is a model file this command wrote (it may be replaced)."""
    from scdino.errors import CheckpointError
    from scdino.models.checkpoint import safe_load

    try:
        obj = safe_load(path)
    except CheckpointError:
        return False
    return isinstance(obj, dict) and isinstance(obj.get("scdino"), dict) and "source_sha256" in obj["scdino"]


def package_backbone(checkpoint: str, out: str, half: bool = False, key: str = CHECKPOINT_KEY) -> dict:
    claim_file(out, inputs=[checkpoint], ours=_packaged)
    packaged = compact_backbone(checkpoint, key, half)
    meta = packaged["scdino"]
    tmp = f"{out}.tmp"
    torch.save(packaged, tmp)
    os.replace(tmp, out)
    return {"arch": meta["arch"], "channels": meta.get("channels"), "mb": os.path.getsize(out) / 1e6}
