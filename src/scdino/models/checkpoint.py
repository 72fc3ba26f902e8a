"""Checkpoint I/O: safe loading, DINO / scDINO / scdino-train layouts, hub names, architecture inference, and
:func:`open_checkpoint`, the one place that turns a MODEL spec (packaged name, hub name, path, ``random:ARCH``) into a
checkpoint.

torch is imported by the functions that read tensors, not by this module: hashing a file and the memo of the last
checkpoint read are used on paths that never load a model (a run on a cached export)."""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import pickle
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from scdino.data import PACKAGED_MODELS, WITHDRAWN_MODELS, packaged_model_path
from scdino.defaults import CHECKPOINT_KEY
from scdino.errors import CheckpointError
from scdino.models.arch import FAMILIES, ViTConfig, arch_name

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

#: Hub names of DINO's ImageNet ViTs -> file published by the DINO authors.
HUB_URLS: dict[str, str] = {
    "dino_vits16": "https://dl.fbaipublicfiles.com/dino/dino_deitsmall16_pretrain/dino_deitsmall16_pretrain.pth",
    "dino_vits8": "https://dl.fbaipublicfiles.com/dino/dino_deitsmall8_pretrain/dino_deitsmall8_pretrain.pth",
    "dino_vitb16": "https://dl.fbaipublicfiles.com/dino/dino_vitbase16_pretrain/dino_vitbase16_pretrain.pth",
    "dino_vitb8": "https://dl.fbaipublicfiles.com/dino/dino_vitbase8_pretrain/dino_vitbase8_pretrain.pth",
}

#: The only non-tensor globals a DINO-style checkpoint needs (its ``args`` entry is an argparse Namespace).
SAFE_GLOBALS: list[Any] = [argparse.Namespace]
#: the spec of an untrained model: ``random:ARCH``
RANDOM = "random:"

_PREFIXES = ("module.", "backbone.", "_orig_mod.")
_BLOCK_RE = re.compile(r"^blocks\.(\d+)\.")


@dataclass
class Checkpoint:
    """A ViT backbone state dict with what is known about it."""

    state_dict: dict[str, torch.Tensor]
    config: ViTConfig
    source: str
    sha256: str | None
    layout: str
    key: str | None = None
    #: scdino-train metadata: channel names, mean/std, arch; empty for DINO/scDINO files
    meta: dict[str, Any] = field(default_factory=dict)


def sha256_of(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def safe_load(path: str | os.PathLike) -> Any:
    """``torch.load(weights_only=True)`` admitting only :data:`SAFE_GLOBALS`; clear errors otherwise."""
    import torch

    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"{p}: no such checkpoint file; pass a .pth file, a hub name or random:ARCH")
    with open(p, "rb") as f:
        head = f.read(4)
    if not (head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"):  # torch's zip format, or a (legacy) pickle
        raise CheckpointError(
            f"{p}: not a PyTorch checkpoint (neither torch.save's zip format nor a pickle; the file starts with "
            f"{head!r}); pass a .pth file written by torch.save, a hub name or random:ARCH"
        )
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        boiler = ("Weights only load failed", "Please file an issue", "Check the documentation")
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip() and not ln.strip().startswith(boiler)]
        unsafe = [ln for ln in lines if "GLOBAL" in ln]
        if not unsafe:  # not a refused object: a damaged file, or a pickle torch's safe loader cannot parse
            why = (lines[0] if lines else type(exc).__name__)[:200]
            raise CheckpointError(
                f"{p}: cannot be read as a PyTorch checkpoint ({why}); the file is damaged, or a pickle of other "
                "Python objects: download or copy it again, or save the weights with torch.save(model.state_dict())"
            ) from exc
        first = unsafe[0][:200]
        raise CheckpointError(
            f"{p}: refused, the file holds Python objects that could run code when loaded ({first}). "
            "Only tensors, plain containers and argparse.Namespace are admitted; re-save the weights with "
            "torch.save(model.state_dict(), ...) from a trusted environment"
        ) from exc
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError, KeyError, IndexError) as exc:
        raise CheckpointError(
            f"{p}: cannot be read as a PyTorch checkpoint ({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); "
            "the file is truncated or not a checkpoint: download or copy it again"
        ) from exc


def _strip(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in sd.items():
        changed = True
        while changed:
            changed = False
            for p in _PREFIXES:
                if k.startswith(p):
                    k, changed = k[len(p) :], True
        out[k] = v
    return out


def extract_backbone(
    obj: Any, key: str | None = CHECKPOINT_KEY, source: str = "<memory>"
) -> tuple[dict, str, str | None]:
    """Find the ViT backbone state dict in any supported layout; returns (state dict, layout, key used)."""
    import torch

    if not isinstance(obj, dict):
        raise CheckpointError(f"{source}: expected a dict of weights, found {type(obj).__name__}")
    layout, used = "backbone", None
    if "teacher" in obj or "student" in obj:
        layout = "dino-full"
        used = key or CHECKPOINT_KEY
        if used not in obj:
            raise CheckpointError(
                f"{source}: no {used!r} entry in this DINO checkpoint (entries: {', '.join(map(str, obj))}); "
                "pass --checkpoint-key teacher or student"
            )
        sd = obj[used]
    elif "state_dict" in obj or "model" in obj:
        used = "state_dict" if "state_dict" in obj else "model"
        layout, sd = f"wrapped[{used}]", obj[used]
    else:
        sd = obj
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"{source}: the {used or 'top-level'} entry is not a state dict of tensors")
    sd = _strip(sd)
    # the DINO projection head is not part of the backbone
    sd = {k: v for k, v in sd.items() if not (k.startswith("head.") or k.startswith("last_layer."))}
    missing = [k for k in ("cls_token", "pos_embed", "patch_embed.proj.weight") if k not in sd]
    if missing:
        shown = ", ".join(list(sd)[:6])
        raise CheckpointError(
            f"{source}: not a DINO ViT checkpoint, {', '.join(missing)} missing (keys start: {shown}); "
            "scdino reads ViT-S/B checkpoints of DINO, scDINO and scdino-train"
        )
    return sd, layout, used


def infer_config(sd: dict[str, torch.Tensor], arch_hint: str | None = None, source: str = "<memory>") -> ViTConfig:
    """Architecture from the shapes of a backbone state dict (heads from the hint, the family, or dim / 64)."""
    d = sd["cls_token"].shape[-1]
    w = sd["patch_embed.proj.weight"]
    patch, in_chans = w.shape[-1], w.shape[1]
    depth = 1 + max((int(m.group(1)) for k in sd if (m := _BLOCK_RE.match(k))), default=-1)
    if depth == 0:
        raise CheckpointError(f"{source}: no transformer blocks in the checkpoint")
    n = sd["pos_embed"].shape[1] - 1
    grid = int(round(n**0.5))
    if grid * grid != n:
        raise CheckpointError(f"{source}: position embedding of {n} patches is not a square grid")
    hidden = sd["blocks.0.mlp.fc1.weight"].shape[0] if "blocks.0.mlp.fc1.weight" in sd else 4 * d
    heads = None
    if arch_hint:
        fam = re.sub(r"\d+$", "", arch_hint)
        if fam in FAMILIES and FAMILIES[fam][0] == d:
            heads = FAMILIES[fam][2]
    if heads is None:
        heads = next((h for (dd, dep, h) in FAMILIES.values() if dd == d and dep == depth), max(1, d // 64))
    return ViTConfig(
        embed_dim=d,
        depth=depth,
        num_heads=heads,
        patch_size=patch,
        in_chans=in_chans,
        img_size=grid * patch,
        mlp_ratio=hidden / d,
        qkv_bias="blocks.0.attn.qkv.bias" in sd,
    )


#: the last checkpoint read in this process, keyed by the file's identity (see :func:`read_checkpoint`)
_LAST: dict[tuple, Checkpoint] = {}


def read_checkpoint(path: str | os.PathLike, key: str | None = CHECKPOINT_KEY) -> Checkpoint:
    """Load a checkpoint file of any supported layout safely.

    A run describes its model before any work starts and may build it again later in the same process (PyTorch in an
    in-process worker, ``--fast``'s smaller input): the last checkpoint read is kept and reused while the file is the
    same (path, size, modification time, inode), so that a file is read and hashed once. :func:`forget_checkpoints`
    drops it."""
    try:
        st = os.stat(path)
        ident = (os.path.realpath(path), st.st_size, st.st_mtime_ns, st.st_ino, key)
    except OSError:
        ident = None  # safe_load says what is wrong with the path
    if ident is not None and ident in _LAST:
        return _LAST[ident]
    ckpt = _read_checkpoint(path, key)
    _LAST.clear()
    if ident is not None:
        _LAST[ident] = ckpt
    return ckpt


def forget_checkpoints() -> None:
    """Drop the checkpoint :func:`read_checkpoint` keeps (its memory is freed once no model holds its tensors)."""
    _LAST.clear()


def _read_checkpoint(path: str | os.PathLike, key: str | None) -> Checkpoint:
    src = str(path)
    obj = safe_load(path)
    sd, layout, used = extract_backbone(obj, key, src)
    meta = dict(obj.get("scdino", {})) if isinstance(obj, dict) and isinstance(obj.get("scdino"), dict) else {}
    hint = meta.get("arch")
    args = obj.get("args") if isinstance(obj, dict) else None
    if hint is None and isinstance(args, argparse.Namespace):
        hint = getattr(args, "arch", None)
    cfg = infer_config(sd, hint, src)
    return Checkpoint(sd, cfg, src, sha256_of(path), layout, used, meta)


def hub_path(name: str) -> Path:
    """Local file of a hub model, downloaded once into torch hub's cache."""
    import torch

    url = HUB_URLS[name]
    dest = Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[-1]
    if dest.is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    log.info("downloading %s from %s into %s", name, url, dest)
    try:
        torch.hub.download_url_to_file(url, str(dest), progress=True)
    except Exception as exc:  # urllib raises many types; all mean the same thing to the user
        raise CheckpointError(
            f"{name}: the download from {url} failed ({type(exc).__name__}: {exc}). Without network access, "
            f"download the file elsewhere and pass its path instead of {name}, or copy it to {dest}"
        ) from exc
    return dest


def checkpoint_file(spec: str) -> Path | None:
    """The file a MODEL ``spec`` names: a packaged model, a hub name (downloaded once), a path; None for
    ``random:ARCH`` (untrained, no file). The one dispatcher of model names to files."""
    if spec.startswith(RANDOM):
        return None
    if spec in WITHDRAWN_MODELS:
        raise CheckpointError(f"--model {spec}: {WITHDRAWN_MODELS[spec]}")
    if spec in PACKAGED_MODELS:
        path = packaged_model_path(spec)
        if not path.is_file():
            raise CheckpointError(
                f"this installation has no file for the packaged model {spec!r} (scdino/data/{PACKAGED_MODELS[spec]}); "
                "pass --model with a checkpoint, a hub name or random:ARCH"
            )
        return Path(path)
    if spec in HUB_URLS:
        return hub_path(spec)
    return Path(spec)


def open_checkpoint(spec: str, key: str | None = CHECKPOINT_KEY) -> Checkpoint | None:
    """The checkpoint a MODEL ``spec`` names (see :func:`checkpoint_file`); None for ``random:ARCH``."""
    path = checkpoint_file(spec)
    if path is None:
        return None
    # a path is read as given (the checkpoint's source, recorded with outputs, is the user's spelling of it)
    named = spec in PACKAGED_MODELS or spec in HUB_URLS
    return read_checkpoint(str(path) if spec in PACKAGED_MODELS else path if named else spec, key)


def compact_backbone(spec: str, key: str | None = CHECKPOINT_KEY, half: bool = False) -> dict[str, Any]:
    """What a compact model file holds (``{"model": backbone state dict, "scdino": metadata}``): the backbone of the
    checkpoint ``spec`` names, float16 when ``half``, with its metadata and the source's sha256."""
    ck = open_checkpoint(spec, key)
    if ck is None:
        raise CheckpointError(f"{spec}: an untrained model has no weights to package; pass a checkpoint")
    sd = {k: (v.half() if half and v.is_floating_point() else v).contiguous() for k, v in ck.state_dict.items()}
    meta = {
        **ck.meta,
        "arch": ck.meta.get("arch") or arch_name(ck.config),
        "source_sha256": ck.sha256,
        "source_checkpoint_key": ck.key,
        "stored_as": "float16" if half else "float32",
    }
    return {"model": sd, "scdino": meta}
