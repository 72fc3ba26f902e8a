"""The model card: what any MODEL spec is, read once, in one typed description.

A MODEL spec is ``default``, a checkpoint file, a hub name, ``random:ARCH``, an exported ``model.onnx`` or a TensorRT
``model.plan``. :func:`describe_model` resolves it into a :class:`ModelCard` (format, architecture, input size,
channels, preprocessing, hashes, precision, untrained or not); the pipeline, the backends, evaluate and export read the
card instead of asking the file again, and :meth:`ModelCard.load` builds a checkpoint's model from its card (the one
way outside :mod:`scdino.models` to get a torch model). :func:`check_channels` is the one check of the channels a run
gives a model.

A card of a checkpoint is made from the checkpoint's weights and metadata without building the network (torch reads
the file; :meth:`ModelCard.load` builds the network, once); a card of an exported model from its sidecar (no torch),
and a card saved with :meth:`ModelCard.to_record` comes back with :meth:`ModelCard.from_record` (no torch:
the export cache keeps the cards of the checkpoints it exported).
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from scdino._optional import require
from scdino.defaults import ADAPT, CHECKPOINT_KEY, INPUT_SIZE
from scdino.errors import CheckpointError, ConfigError
from scdino.models.checkpoint import sha256_of
from scdino.models.checks import check_channels, display_name
from scdino.models.sidecar import HASH_KEY, check_identity, read_sidecar
from scdino.preprocess import Preprocessing

if TYPE_CHECKING:
    from scdino.models.loader import LoadedModel

__all__ = [
    "ModelCard",
    "PlanInfo",
    "check_channels",
    "check_onnx_file",
    "describe_model",
    "display_name",
    "model_format",
]

#: the formats a model comes in (see :func:`model_format`)
FORMATS = ("checkpoint", "onnx", "plan")


def model_format(model: str) -> str:
    """``plan`` (TensorRT), ``onnx`` or ``checkpoint`` (anything PyTorch loads: file, hub name, random:ARCH)."""
    low = str(model).lower()
    return "plan" if low.endswith((".plan", ".engine")) else "onnx" if low.endswith(".onnx") else "checkpoint"


@dataclass(frozen=True)
class PlanInfo:
    """What a TensorRT plan was built for (from its sidecar)."""

    version: str
    gpu: str
    compute_capability: str
    max_batch: int
    input_dtype: str
    #: the names of the graph's input and output the plan was built from (the sidecar's ``graph``); the TensorRT
    #: backend refuses a plan whose own tensors are named otherwise
    input_name: str = "crops"
    output_name: str = "cls"


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
    #: checkpoints: how the model is built from the file (the entry of a DINO checkpoint, the channel adaptation of
    #: an RGB model, the seed of an untrained one)
    checkpoint_key: str | None = CHECKPOINT_KEY
    adapt: str = ADAPT
    seed: int = 0
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

    def load(self) -> LoadedModel:
        """The model of a checkpoint's card, built for its channel count and input size (the position embedding
        resized once): the backbone in eval mode, its preprocessing and what is known about it."""
        if self.format != "checkpoint":
            raise ConfigError(
                f"{self.spec}: an exported {self.format} model runs on its own backend; PyTorch needs the checkpoint "
                f"it was exported from ({self.details.get('source') or 'see its sidecar'})"
            )
        from scdino.models.loader import load_model  # torch: only where a model is built

        return load_model(self.spec, self.in_chans, self.input_size, self.checkpoint_key, self.adapt, self.seed)

    def weights(self) -> dict:
        """The state dict this card's network is built with (channels adapted, position embedding resized), for a
        network made elsewhere (training's student): a checkpoint's without building its network; an untrained
        model's weights are drawn by building it (seeded)."""
        if self.format != "checkpoint":
            raise ConfigError(f"{self.spec}: an exported {self.format} model has no weights to initialise a network")
        if self.untrained:
            return self.load().model.state_dict()
        from scdino.models.loader import plan_model, plan_weights  # torch

        return plan_weights(
            plan_model(self.spec, self.in_chans, self.input_size, self.checkpoint_key, self.adapt, self.seed)
        )

    def at_input_size(self, size: int) -> ModelCard:
        """The same checkpoint's card at another input size (its position embedding resized when it is built), as
        :func:`describe_model` with ``input_size=size`` describes it, without building the model again."""
        if self.format != "checkpoint":
            raise ConfigError(f"{self.spec}: an exported model runs at the input size it was exported for")
        if size % self.patch_size:
            raise ConfigError(f"--input-size {size} is not a multiple of the patch size {self.patch_size}")
        config = {**dict(self.details.get("config") or {}), "img_size": size}
        details = {**dict(self.details), "config": config, "input_size": size}
        return replace(
            self, input_size=size, preprocessing=replace(self.preprocessing, input_size=size), details=details
        )

    def to_record(self) -> dict[str, Any]:
        """Everything on the card as plain JSON (:meth:`from_record` is its inverse)."""
        d = {f: getattr(self, f) for f in self.__dataclass_fields__}
        d.update(preprocessing=self.preprocessing.to_dict(), details=dict(self.details))
        d.update(channels=list(self.channels) if self.channels else None)
        d.update(plan=asdict(self.plan) if self.plan else None)
        return json.loads(json.dumps(d))

    @classmethod
    def from_record(cls, d: Mapping[str, Any]) -> ModelCard:
        """The card :meth:`to_record` wrote."""
        return cls(
            **{
                **d,
                "preprocessing": Preprocessing.from_dict(d["preprocessing"]),
                "channels": tuple(d["channels"]) if d.get("channels") else None,
                "plan": PlanInfo(**d["plan"]) if d.get("plan") else None,
            }
        )


def describe_model(
    spec: str,
    *,
    channels: Sequence[str] | None = None,
    n_channels: int | None = None,
    available: Sequence[str] | None = None,
    input_size: int | None = None,
    checkpoint_key: str | None = CHECKPOINT_KEY,
    adapt: str = ADAPT,
    seed: int = 0,
    crop_size: int | None = None,
    verified_sha256: str | None = None,
) -> ModelCard:
    """The card of MODEL ``spec`` for a run that gives it ``channels`` (names, in order) or ``n_channels``.

    A checkpoint is read and checked here, its network not built (so that a bad file or a channel mismatch fails before
    any work starts, and a command builds each model once, when it loads the card); an exported model is described by
    its sidecar. ``n_channels`` None with no names means the model's own count.
    ``crop_size``: the size of the run's crops, which a TensorRT plan must have been built for. ``verified_sha256``:
    the sha256 of an exported file its caller has just checked (the export cache): the file is not read again.
    """
    n = len(channels) if channels is not None else n_channels
    fmt = model_format(spec)
    if fmt != "checkpoint":
        return _exported_card(spec, fmt, channels, n, available, crop_size, verified_sha256)
    if str(spec).startswith("random:"):
        return _random_card(spec, channels, n, available, input_size, checkpoint_key, adapt, seed)
    from scdino.models.loader import plan_model  # torch: a checkpoint's weights are read (the network is not built)

    plan = plan_model(spec, n, input_size, checkpoint_key, adapt, seed, channel_names=channels, available=available)
    info = dict(plan.info)
    return ModelCard(
        spec=spec,
        format=fmt,
        arch=info["arch"],
        embed_dim=int(info["embed_dim"]),
        input_size=plan.prep.input_size,
        preprocessing=plan.prep,
        untrained=bool(info["untrained"]),
        in_chans=plan.cfg.in_chans,
        channels=tuple(info["channels"]) if info.get("channels") else None,
        checkpoint_sha256=info.get("checkpoint_sha256"),
        checkpoint_key=checkpoint_key,
        adapt=adapt,
        seed=seed,
        details=info,
    )


def _random_card(
    spec: str,
    channels: Sequence[str] | None,
    n: int | None,
    available: Sequence[str] | None,
    input_size: int | None,
    checkpoint_key: str | None,
    adapt: str,
    seed: int,
) -> ModelCard:
    """The card of an untrained ``random:ARCH`` model from its architecture alone: no torch, no weights drawn (the
    same card :func:`~scdino.models.loader.load_model` describes; ``.load()`` builds the model)."""
    from scdino.models.arch import arch_config, arch_name

    if n is None:
        raise ConfigError(
            f"{spec}: adapts to any number of channels; say how many with --channels NAMES or --n-channels N"
        )
    if n < 1:
        raise ConfigError(f"need at least one channel, got {n}")
    check_channels(spec, None, None, n, channels, available)
    size = INPUT_SIZE if input_size is None else input_size
    cfg = arch_config(spec.split(":", 1)[1], in_chans=n, img_size=size)
    if size % cfg.patch_size:
        raise ConfigError(f"--input-size {size} is not a multiple of the patch size {cfg.patch_size}")
    info = {"model": spec, "untrained": True, "seed": seed, "checkpoint_sha256": None, "layout": None}
    info.update(arch=arch_name(cfg), config=cfg.to_dict(), embed_dim=cfg.embed_dim, input_size=size)
    return ModelCard(
        spec=spec,
        format="checkpoint",
        arch=info["arch"],
        embed_dim=cfg.embed_dim,
        input_size=size,
        preprocessing=Preprocessing(size),
        untrained=True,
        in_chans=n,
        channels=None,
        checkpoint_sha256=None,
        checkpoint_key=checkpoint_key,
        adapt=adapt,
        seed=seed,
        details=info,
    )


def check_onnx_file(path: str) -> Any:
    """Refuse an ONNX file that does not parse (truncated or damaged), before a run starts any work with it. Returns
    the parsed model (its graph's declared shapes are checked against the sidecar by :func:`check_identity`)."""
    onnx = require("onnx")
    try:
        return onnx.load_model(path, load_external_data=False)
    except FileNotFoundError as exc:
        raise CheckpointError(f"{path}: no such file; pass the path of an exported model.onnx") from exc
    except Exception as exc:  # protobuf's DecodeError and onnx's own errors: the bytes are not a model
        raise CheckpointError(
            f"{path}: not a readable ONNX model ({type(exc).__name__}: {str(exc)[:200]}); the file is truncated or "
            "damaged: export it again with scdino-export onnx, or copy it again"
        ) from exc


def _graph_names(meta: dict) -> dict[str, str]:
    """The input and output names an export's sidecar records (``graph``), where it records them."""
    graph = meta.get("graph") or {}
    ins, outs = graph.get("inputs") or [], graph.get("outputs") or []
    return {
        **({"input_name": str(ins[0]["name"])} if ins and ins[0].get("name") else {}),
        **({"output_name": str(outs[0]["name"])} if outs and outs[0].get("name") else {}),
    }


def _exported_card(
    spec: str,
    fmt: str,
    channels: Sequence[str] | None,
    n: int | None,
    available: Sequence[str] | None,
    crop_size: int | None,
    verified_sha256: str | None,
) -> ModelCard:
    meta = read_sidecar(spec)
    sha = verified_sha256 or sha256_of(spec)
    proto = check_onnx_file(spec) if fmt == "onnx" and verified_sha256 is None else None
    if verified_sha256 is None or meta.get(HASH_KEY[fmt]):  # the export cache checked its own entry's sha256
        check_identity(spec, meta, fmt, sha, proto)
    names = tuple(meta["channels"]) if meta.get("channels") else None
    if n is not None:
        check_channels(spec, int(meta["in_chans"]), names, n, channels, available)
    trt = meta.get("tensorrt")
    plan = None
    if fmt == "plan":
        if crop_size is not None and int(meta["crop_size"]) != crop_size:
            raise ConfigError(
                f"{spec}: built for {meta['crop_size']} px crops, the run cuts {crop_size} px crops; rebuild the "
                f"plan for this crop size or use --crop-size {meta['crop_size']}"
            )
        plan = PlanInfo(
            version=str(trt.get("version")),
            gpu=str(trt.get("gpu")),
            compute_capability=str(trt.get("compute_capability")),
            max_batch=int(trt["max_batch"]),
            input_dtype=str(meta["input_dtype"]),
            **_graph_names(meta),
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
        exported_sha256=sha,
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
