"""Export a ViT with SPEC section 3 inside the graph: raw crops in the crop dtype -> CLS token (+ attention).

The graph: Cast to float32 -> per-crop, per-channel min-max (constant channel -> 0), or the model's fixed
per-channel range clipped to [0, 1] (``intensity_scaling=dataset``) -> bilinear Resize to the
input size -> channel mean/std -> ViT (position embedding precomputed for the input size) -> CLS token after the
final LayerNorm. Batch, height and width are dynamic. ``precision="fp16"`` keeps preprocessing, LayerNorm and
the outputs in float32 and runs the rest in float16 (for GPUs: ONNX Runtime CUDA, TensorRT).
"""

from __future__ import annotations

import logging
import os
import time
from typing import TYPE_CHECKING, Sequence

import numpy as np

from scdino.cells.options import DEFAULT_CROP_SIZE
from scdino.defaults import ADAPT, CHECKPOINT_KEY
from scdino.errors import ConfigError
from scdino.export.verify import verify
from scdino.models.card import ModelCard, describe_model
from scdino.models.checkpoint import sha256_of
from scdino.models.sidecar import with_file_hash, write_sidecar
from scdino.outputs import claim_file
from scdino.preprocess import Preprocessing
from scdino.progress import heartbeat

if TYPE_CHECKING:
    from scdino.models.loader import LoadedModel

log = logging.getLogger(__name__)

DTYPES = {"uint16": np.uint16, "uint8": np.uint8, "float32": np.float32}
ONNX_TYPES = {"uint16": 4, "uint8": 2, "float32": 1}  # onnx.TensorProto enum values
OPSET = 18


def _prepend_cast(path: str, dtype: str) -> None:
    """Make the graph input ``crops`` of ``dtype`` with a Cast to float32 (the tracer cannot take uint16)."""
    import onnx
    from onnx import TensorProto, helper

    model = onnx.load(path)
    g = model.graph
    inp = g.input[0]
    inner = "crops_float32"
    for node in g.node:
        node.input[:] = [inner if i == inp.name else i for i in node.input]
    g.node.insert(0, helper.make_node("Cast", [inp.name], [inner], to=TensorProto.FLOAT, name="CastCrops"))
    inp.type.tensor_type.elem_type = ONNX_TYPES[dtype]
    onnx.checker.check_model(model)
    onnx.save(model, path)


def export_onnx(
    model: str | ModelCard,
    out: str | os.PathLike,
    n_channels: int | None = None,
    channels: Sequence[str] | None = None,
    crop_size: int = DEFAULT_CROP_SIZE,
    input_size: int | None = None,
    dtype: str = "uint16",
    attention: bool = False,
    precision: str = "fp32",
    checkpoint_key: str | None = CHECKPOINT_KEY,
    adapt: str = ADAPT,
    verify_with: np.ndarray | None = None,
    tolerance: dict | None = None,
) -> dict:
    """Export MODEL (a spec, or the card of a checkpoint: then ``n_channels``, ``input_size``, ``checkpoint_key`` and
    ``adapt`` are the card's) to ``out`` (.onnx) plus its ``.json`` sidecar, verified against PyTorch. Returns the
    sidecar. The graph is written to ``OUT.partial.onnx`` first and moved into place only once verified; on any failure
    the partial file is removed."""
    if dtype not in DTYPES:
        raise ConfigError(f"--dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    if precision not in ("fp32", "fp16"):
        raise ConfigError(f"--precision {precision!r}: expected fp32 or fp16")
    card = model if isinstance(model, ModelCard) else None
    if card is None:
        card = describe_model(
            model,
            channels=channels,
            n_channels=n_channels,
            input_size=input_size,
            checkpoint_key=checkpoint_key,
            adapt=adapt,
        )
    model = card.spec
    _check_fixed_range(model, card.preprocessing, dtype)
    from scdino.export import graph  # torch: only an export needs it

    lm = card.load()
    if channels is None and lm.channels:
        channels = lm.channels
    out = claim_file(out, inputs=[model])
    tmp = out.with_name(out.stem + ".partial.onnx")
    names = ["cls", "attention"] if attention else ["cls"]
    try:
        t0 = time.perf_counter()
        graph.trace(
            graph.ExportModule(lm, attention, precision).eval(), tmp, lm.model.cfg.in_chans, crop_size, names, OPSET
        )
        if dtype != "float32":
            _prepend_cast(str(tmp), dtype)
        meta = _sidecar(model, lm, channels, crop_size, dtype, precision, attention, names)
        meta["torch"] = graph.TORCH_VERSION
        meta["export_seconds"] = round(time.perf_counter() - t0, 2)
        with heartbeat(f"verifying {out.name} against PyTorch"):
            meta["verification"] = verify(str(tmp), lm, meta, verify_with, tolerance)
        meta = with_file_hash(meta, "onnx", sha256_of(tmp))  # the sidecar proves which graph it describes
        # the sidecar first: a model file is never left without the sidecar that says scdino wrote it
        write_sidecar(out, meta)
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    v = meta["verification"]
    log.info(
        "exported %s -> %s in %.1f s (verified: max abs %.2e, min cosine %.6f)",
        model,
        out,
        meta["export_seconds"],
        v["max_abs_diff"],
        v["min_cosine"],
    )
    return meta


def _check_fixed_range(model: str, prep: Preprocessing, dtype: str) -> None:
    """A model trained with a fixed intensity range needs crops of a dtype that can reach that range."""
    if prep.scale_hi is None or not np.issubdtype(np.dtype(dtype), np.integer):
        return
    top = np.iinfo(np.dtype(dtype)).max
    if top < max(prep.scale_hi) * 0.5:
        raise ConfigError(
            f"{model}: trained with a fixed intensity range up to {max(prep.scale_hi):g}, but --dtype {dtype} "
            f"crops reach only {top}: every cell would look nearly black. Export with the dtype of the data the "
            "model was trained on (e.g. --dtype uint16)"
        )


#: how the engine cuts a cell's crop from a field (scdino.cells.table.field_cells and read_crops), for a user who
#: feeds the graph crops of their own
CROP_RULE = {
    "window": "crop_size x crop_size pixels of the field, all channels, in the order of 'channels'",
    "centre": (
        "the window's top-left pixel is (round(cy) - crop_size // 2, round(cx) - crop_size // 2), (cy, cx) being the "
        "nucleus' intensity-weighted centroid on the image it was segmented on (--segment-channel; the cell table's "
        "centroid_y, centroid_x), or its geometric centroid when it has no signal there; round is numpy's (halves to "
        "even)"
    ),
    "border": (
        "pixels of the window outside the field are 0 (zero padding; the cell table flags such cells border=True), "
        "or such cells are left out (--border skip)"
    ),
    "values": (
        "raw pixel values in the input's dtype, not scaled: intensity scaling, the resize to input_size and the "
        "channel mean/std are inside the graph"
    ),
    "size": "any height and width are accepted (resized bilinearly inside the graph); verified at crop_size",
}


def graph_io(lm: LoadedModel, channels, dtype: str, names: Sequence[str]) -> dict:
    """The graph's input and outputs by name: dtype, shape (named dynamic axes) and meaning."""
    cfg = lm.model.cfg
    patches = (lm.prep.input_size // cfg.patch_size) ** 2
    outputs = {
        "cls": {
            "dtype": "float32",
            "shape": ["batch", cfg.embed_dim],
            "meaning": "the CLS token after the final LayerNorm: the cell's embedding",
        },
        "attention": {
            "dtype": "float32",
            "shape": ["batch", cfg.num_heads, patches],
            "meaning": (
                f"last block's attention of the CLS token to each patch, per head; the {patches} patches row by row "
                f"({lm.prep.input_size // cfg.patch_size} x {lm.prep.input_size // cfg.patch_size})"
            ),
        },
    }
    return {
        "inputs": [
            {
                "name": "crops",
                "dtype": dtype,
                "shape": ["batch", cfg.in_chans, "height", "width"],
                "channels": list(channels) if channels else None,
                "meaning": "raw crops, one per cell, cut by crop_rule",
            }
        ],
        "outputs": [{"name": n, **outputs[n]} for n in names],
    }


def _sidecar(model, lm: LoadedModel, channels, crop_size, dtype, precision, attention, names) -> dict:
    """``model.json``: what the graph is, what it expects and where it came from."""
    cfg = lm.model.cfg
    return {
        "model": model,
        "arch": lm.info["arch"],
        "patch_size": cfg.patch_size,
        "embed_dim": cfg.embed_dim,
        "num_heads": cfg.num_heads,
        "in_chans": cfg.in_chans,
        "channels": list(channels) if channels else None,
        "crop_size": crop_size,
        "input_size": lm.prep.input_size,
        "dtype": dtype,
        "precision": precision,
        "preprocessing": lm.prep.to_dict(),
        "attention_output": attention,
        "opset": OPSET,
        "checkpoint_sha256": lm.info.get("checkpoint_sha256"),
        "untrained": lm.info.get("untrained"),
        "adaptation": lm.info.get("adaptation"),
        "checkpoint_key": lm.info.get("checkpoint_key"),
        "outputs": names,
        "graph": graph_io(lm, channels, dtype, names),
        "crop_rule": CROP_RULE,
    }
