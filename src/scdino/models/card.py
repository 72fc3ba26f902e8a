"""The model card: what any MODEL spec is, read once, in one typed description.

A MODEL spec is ``default``, a checkpoint file, a hub name, ``random:ARCH``, an exported ``model.onnx`` or a TensorRT
``model.plan``. :func:`describe_model` resolves it into a :class:`ModelCard` (format, architecture, input size,
channels, preprocessing, hashes, precision, untrained or not); the pipeline, the backends, evaluate and export read the
card instead of asking the file again. :func:`check_channels` is the one check of the channels a run gives a model.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from scdino._optional import require
from scdino.errors import CheckpointError, ConfigError
from scdino.preprocess import Preprocessing

#: formats a model comes in, and the backend that runs each natively
FORMATS = {"checkpoint": "torch", "onnx": "onnxruntime", "plan": "tensorrt"}


def model_format(model: str) -> str:
    """``plan`` (TensorRT), ``onnx`` or ``checkpoint`` (anything PyTorch loads: file, hub name, random:ARCH)."""
    low = str(model).lower()
    return "plan" if low.endswith((".plan", ".engine")) else "onnx" if low.endswith(".onnx") else "checkpoint"


def display_name(spec: str) -> str:
    """How messages name a model: ``default`` is "the default model", anything else its spec."""
    if spec == "default":
        return "the default model"
    from scdino.data import PACKAGED_MODELS

    return f"the packaged model {spec}" if spec in PACKAGED_MODELS else spec


@dataclass(frozen=True)
class PlanInfo:
    """What a TensorRT plan was built for (from its sidecar)."""

    version: str
    gpu: str
    compute_capability: str
    max_batch: int
    input_dtype: str


@dataclass(frozen=True)
class ModelCard:
    """A model as the engine sees it. Frozen and hashable (``details`` is left out of the hash)."""

    spec: str
    format: str
    arch: str
    embed_dim: int
    input_size: int
    preprocessing: Preprocessing
    untrained: bool
    #: the channel count the model needs; None for RGB and random models, which adapt to any count
    in_chans: int | None
    #: the channel names it was trained or exported for, where known
    channels: tuple[str, ...] | None
    checkpoint_sha256: str | None
    precision: str = "fp32"
    #: exported models: the sha256 of the file, the raw crop dtype the graph takes and the crop size it was made for
    exported_sha256: str | None = None
    dtype: str | None = None
    crop_size: int | None = None
    plan: PlanInfo | None = None
    #: everything else known about the model (layout, adaptation, checkpoint key, ...), recorded with the output
    details: Mapping[str, Any] = field(default_factory=dict, compare=False, hash=False)

    @property
    def name(self) -> str:
        return display_name(self.spec)

    @property
    def patch_size(self) -> int:
        """Side of a patch in pixels: as the model says, else from its arch name (``vit_tiny8``: 8), else 16."""
        d = self.details
        named = re.search(r"(\d+)$", self.arch or "")
        return int(d.get("patch_size") or dict(d.get("config") or {}).get("patch_size") or (named and named[1]) or 16)

    @property
    def tokens(self) -> int:
        """Tokens per crop: the patches of an input plus the CLS token."""
        return (self.input_size // self.patch_size) ** 2 + 1

    def to_dict(self) -> dict[str, Any]:
        """JSON-able description for ``uns["scdino"]["model"]`` (without the preprocessing, stored on its own)."""
        d = {
            **dict(self.details),
            "model": self.spec,
            "format": self.format,
            "untrained": self.untrained,
            "arch": self.arch,
            "embed_dim": self.embed_dim,
            "input_size": self.input_size,
            "channels": list(self.channels) if self.channels else self.details.get("channels"),
            "checkpoint_sha256": self.checkpoint_sha256,
            "precision": self.precision,
        }
        if self.format != "checkpoint":
            d["exported_sha256"] = self.exported_sha256
        return json.loads(json.dumps(d, default=str))


def check_channels(
    model: str,
    in_chans: int | None,
    trained_on: Sequence[str] | None,
    n_channels: int,
    selected: Sequence[str] | None = None,
    available: Sequence[str] | None = None,
    option: str = "--channels",
) -> None:
    """The one check of the channels a run gives a model: the names it was trained on (where both are known), then
    the count it needs. ``available`` are all the channels of the data, for the advice; ``option`` is the option that
    selects channels in the command that asks (evaluate's is --channel-sets)."""
    name = display_name(model)
    if trained_on and selected is not None and list(trained_on) != list(selected):
        have = list(available) if available is not None else list(selected)
        missing = [c for c in trained_on if c not in have]
        hint = (
            f"pass {option} {','.join(trained_on)}"
            if not missing
            else "this plate lacks them: pass --model with a model for its channels (e.g. dino_vits16, adapted to any "
            "channels, or one trained with scdino-train)"
        )
        raise ConfigError(
            f"{name}: trained on channels {', '.join(trained_on)}, the run selects {', '.join(selected)}; {hint}"
        )
    if in_chans is not None and in_chans != n_channels:
        expect = f" ({', '.join(trained_on)})" if trained_on else ""
        raise ConfigError(
            f"{name}: the model expects {in_chans} channels{expect}, the data give {n_channels}; "
            f"pass {option} to select them"
        )


def describe_model(
    spec: str,
    *,
    channels: Sequence[str] | None = None,
    n_channels: int | None = None,
    available: Sequence[str] | None = None,
    input_size: int | None = None,
    checkpoint_key: str | None = "teacher",
    adapt: str = "mean",
    seed: int = 0,
) -> ModelCard:
    """The card of MODEL ``spec`` for a run that gives it ``channels`` (names, in order) or ``n_channels``.

    A checkpoint is loaded and built here (so that a bad file or a channel mismatch fails before any work starts); an
    exported model is described by its sidecar. ``n_channels`` None with no names means the model's own count.
    """
    n = len(channels) if channels is not None else n_channels
    fmt = model_format(spec)
    if fmt == "checkpoint":
        from scdino.models import load_model

        lm = load_model(spec, n, input_size, checkpoint_key, adapt, seed, channel_names=channels, available=available)
        info = dict(lm.info)
        return ModelCard(
            spec=spec,
            format=fmt,
            arch=info["arch"],
            embed_dim=int(info["embed_dim"]),
            input_size=lm.prep.input_size,
            preprocessing=lm.prep,
            untrained=bool(info["untrained"]),
            in_chans=lm.model.cfg.in_chans,
            channels=tuple(lm.channels) if lm.channels else None,
            checkpoint_sha256=info.get("checkpoint_sha256"),
            details=info,
        )
    return _exported_card(spec, fmt, channels, n, available)


def check_onnx_file(path: str) -> None:
    """Refuse an ONNX file that does not parse (truncated or damaged), before a run starts any work with it."""
    onnx = require("onnx")
    try:
        onnx.load_model(path, load_external_data=False)
    except FileNotFoundError as exc:
        raise CheckpointError(f"{path}: no such file; pass the path of an exported model.onnx") from exc
    except Exception as exc:  # protobuf's DecodeError and onnx's own errors: the bytes are not a model
        raise CheckpointError(
            f"{path}: not a readable ONNX model ({type(exc).__name__}: {str(exc)[:200]}); the file is truncated or "
            "damaged: export it again with scdino-export onnx, or copy it again"
        ) from exc


def _exported_card(
    spec: str, fmt: str, channels: Sequence[str] | None, n: int | None, available: Sequence[str] | None
) -> ModelCard:
    from scdino.models.checkpoint import sha256_of
    from scdino.models.sidecar import read_sidecar

    meta = read_sidecar(spec)
    if fmt == "onnx":
        check_onnx_file(spec)
    names = tuple(meta["channels"]) if meta.get("channels") else None
    if n is not None:
        check_channels(spec, int(meta["in_chans"]), names, n, channels, available)
    trt = meta.get("tensorrt")
    plan = None
    if fmt == "plan":
        plan = PlanInfo(
            version=str(trt.get("version")),
            gpu=str(trt.get("gpu")),
            compute_capability=str(trt.get("compute_capability")),
            max_batch=int(trt["max_batch"]),
            input_dtype=str(meta["input_dtype"]),
        )
    return ModelCard(
        spec=spec,
        format=fmt,
        arch=meta["arch"],
        embed_dim=int(meta["embed_dim"]),
        input_size=int(meta["input_size"]),
        preprocessing=Preprocessing.from_dict(meta["preprocessing"]),
        untrained=bool(meta.get("untrained")),
        in_chans=int(meta["in_chans"]),
        channels=names,
        checkpoint_sha256=meta.get("checkpoint_sha256"),
        precision=meta["precision"],
        exported_sha256=sha256_of(spec),
        dtype=meta["dtype"],
        crop_size=int(meta["crop_size"]),
        plan=plan,
        details={
            "source": meta.get("model"),
            "source_onnx": meta.get("source_onnx"),
            "tensorrt": trt,
            # how the exported checkpoint was made to fit the channels, as a checkpoint's card says
            **{k: meta[k] for k in ("adaptation", "checkpoint_key", "patch_size") if meta.get(k) is not None},
        },
    )
