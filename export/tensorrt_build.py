"""TensorRT engines (``.plan``) built on the GPU that will run them, with NVIDIA's Python builder API.

* an optimisation profile for the batch axis (1 .. ``max_batch``, tuned for ``opt_batch``), crop size fixed;
* a timing cache beside the plan (``.timing.cache``) so that rebuilding on the same GPU is fast;
* ``fp16`` from an ``--precision fp16`` export: a *strongly typed* network (TensorRT >= 10), so the graph's own types
  are obeyed (its preprocessing and LayerNorm are fp32 by construction); weak typing would take the graph's casts as
  hints. TensorRT >= 11 is always strongly typed, so there fp16 needs an fp16 export;
* ``fp16`` from an fp32 export (TensorRT 10 only, weakly typed): the FP16 flag, with every float layer before the
  patch embedding (the preprocessing, including the ``Where`` of min-max scaling, whose first input is bool) and the
  normalisation layers after it pinned to fp32 by their output types; shape and integer layers and softmax are left
  alone (pinning softmax would block fused attention);
* ``int8``: explicit quantisation: the ONNX is first quantised to Q/DQ with calibration crops from the user's plate
  (:func:`scdino.export.quantize.quantize`, static; without ``--calibration`` the packaged neocortex crops are used,
  with a loud warning and a note in the sidecar), then built with INT8 *and* FP16 allowed (TensorRT 10), so layers
  without Q/DQ run in fp16 rather than fp32, pinned as for fp16;
* the precision recorded in the sidecar is the one TensorRT's engine inspector reports for the built plan's layers,
  not the one asked for;
* TensorRT has no uint16 tensors: a uint16 graph input becomes int32 (crops are widened on the host, still far
  smaller than the float model input);
* the sidecar records the GPU name, compute capability and TensorRT version;
  :func:`scdino.models.plan.check_plan` refuses a plan built elsewhere, with the command to rebuild it here.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from scdino._optional import require
from scdino.batches import DEFAULT_BATCH_SIZE, MAX_BATCH
from scdino.errors import ConfigError, ScdinoError
from scdino.models.plan import gpu_identity
from scdino.models.sidecar import read_sidecar, write_sidecar
from scdino.outputs import claim_file

log = logging.getLogger(__name__)


def _widen_uint16_input(src: str, dst: str) -> None:
    import onnx
    from onnx import TensorProto

    model = onnx.load(src)
    inp = model.graph.input[0]
    if inp.type.tensor_type.elem_type == TensorProto.UINT16:
        inp.type.tensor_type.elem_type = TensorProto.INT32
    onnx.save(model, dst)


@dataclass(frozen=True)
class BuildPlan:
    """How a network is built: its creation flags, builder flags, and whether sensitive layers are pinned to fp32."""

    strongly_typed: bool
    flags: tuple[str, ...]
    pin_fp32: bool


def build_plan(trt, precision: str, fp16: bool, int8: bool) -> BuildPlan:
    """The network and builder settings for an export of ``precision`` asked to build as ``fp16`` / ``int8``."""
    major = int(trt.__version__.split(".")[0])
    can_strong = hasattr(trt, "NetworkDefinitionCreationFlag") and hasattr(
        trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"
    )
    weak_ok = major < 11 and hasattr(trt.BuilderFlag, "FP16")
    if int8:
        if precision != "fp32":
            raise ConfigError(f"int8 is built from an fp32 export, not {precision}")
        if not weak_ok:  # always strongly typed: Q/DQ layers in int8, the rest in the graph's fp32
            return BuildPlan(True, (), False)
        return BuildPlan(False, ("INT8", "FP16", "OBEY_PRECISION_CONSTRAINTS"), True)
    if precision == "fp16":
        return BuildPlan(can_strong, (), False) if can_strong else BuildPlan(False, ("FP16",), False)
    if fp16:
        if not weak_ok:
            raise ConfigError(
                f"TensorRT {trt.__version__} takes precisions from the ONNX file: export with "
                "'scdino-export onnx ... --precision fp16' and build from that file"
            )
        return BuildPlan(False, ("FP16", "OBEY_PRECISION_CONSTRAINTS"), True)
    return BuildPlan(False, (), False)


def build_engine(
    onnx_path: str | os.PathLike,
    out: str | os.PathLike,
    fp16: bool = False,
    int8: bool = False,
    calibration: np.ndarray | None = None,
    max_batch: int = MAX_BATCH,
    opt_batch: int = DEFAULT_BATCH_SIZE,
    workspace_gb: float = 4.0,
    timing_cache: str | None = None,
) -> dict:
    """Build a TensorRT plan from an exported ONNX model. Returns the plan's sidecar."""
    trt = require("tensorrt")
    meta = read_sidecar(onnx_path)
    gpu = gpu_identity()
    if meta.get("attention_output"):
        raise ConfigError(
            f"{onnx_path}: exported with --attention; build plans from an export without it (the "
            "engine's TensorRT backend reads the CLS output only; attention maps run on PyTorch)"
        )
    try:
        plan = build_plan(trt, meta["precision"], fp16, int8)
    except ConfigError as exc:
        raise ConfigError(f"{onnx_path}: {exc}") from exc
    if int8 and calibration is None:
        log.warning(
            "int8 without --calibration: the activation ranges come from 48 packaged neocortex nucleus crops, not "
            "from your plate; accuracy on other images may suffer. Pass --calibration crops.npy cut from your plate"
        )
    max_batch, opt_batch = int(max_batch), int(min(opt_batch, max_batch))
    out = claim_file(out, inputs=[onnx_path])
    t0 = time.perf_counter()
    logger = trt.Logger(trt.Logger.WARNING)
    cache_path = Path(timing_cache) if timing_cache else out.with_suffix(".timing.cache")
    with tempfile.TemporaryDirectory() as tmp:
        src = _int8_source(onnx_path, meta, calibration, tmp) if int8 else str(onnx_path)
        widened = os.path.join(tmp, "input.onnx")
        _widen_uint16_input(src, widened)
        shapes = (meta["in_chans"], meta["crop_size"], opt_batch, max_batch)
        serialized = _serialize(trt, logger, widened, onnx_path, plan, shapes, workspace_gb, cache_path)
        tmp_plan = out.with_name(out.name + ".partial")
        tmp_plan.write_bytes(memoryview(serialized))
        os.replace(tmp_plan, out)
    asked = "int8" if int8 else "fp16" if fp16 or meta["precision"] == "fp16" else "fp32"
    layers = inspect_precisions(trt, logger, bytes(memoryview(serialized)))
    pmeta = {
        **meta,
        "precision": dominant_precision(layers) or asked,
        "source_onnx": str(onnx_path),
        "input_dtype": "int32" if meta["dtype"] == "uint16" else meta["dtype"],
        "tensorrt": {
            "version": trt.__version__,
            **gpu,
            "max_batch": max_batch,
            "opt_batch": opt_batch,
            "asked": asked,
            "layer_precisions": layers,
            "strongly_typed": plan.strongly_typed,
            "flags": list(plan.flags),
            "calibration": ("given crops" if calibration is not None else "packaged neocortex crops") if int8 else None,
            "build_seconds": round(time.perf_counter() - t0, 1),
            "timing_cache": str(cache_path),
        },
    }
    write_sidecar(out, pmeta)
    return pmeta


def _serialize(trt, logger, widened: str, onnx_path, plan: BuildPlan, shapes: tuple, workspace_gb: float, cache_path):
    """The serialized engine of the graph at ``widened``: parsed, built with ``plan``'s flags for batches 1 ..
    max_batch of (channels, crop size) in ``shapes`` (tuned for opt_batch), the timing cache read and written back."""
    c, s, opt_batch, max_batch = shapes
    builder = trt.Builder(logger)
    creation = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if plan.strongly_typed else 0
    network = builder.create_network(creation)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(widened):
        errs = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ScdinoError(f"{onnx_path}: TensorRT cannot parse the ONNX graph: {errs}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
    if hasattr(trt, "ProfilingVerbosity"):  # per-layer precisions for the inspector
        config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
    cache = config.create_timing_cache(cache_path.read_bytes() if cache_path.is_file() else b"")
    if config.set_timing_cache(cache, ignore_mismatch=False) is False:
        log.warning(
            "%s: TensorRT did not take the timing cache (another GPU or version?); building without", cache_path
        )
    for flag in plan.flags:
        config.set_flag(getattr(trt.BuilderFlag, flag))
    if plan.pin_fp32:
        pinned = pin_sensitive_layers(trt, network)
        log.info("%d layers pinned to fp32 (preprocessing and normalisation)", pinned)
    profile = builder.create_optimization_profile()
    inp = network.get_input(0)
    profile.set_shape(inp.name, (1, c, s, s), (opt_batch, c, s, s), (max_batch, c, s, s))
    config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ScdinoError(f"{onnx_path}: TensorRT could not build an engine (see the TensorRT log above)")
    cache_path.write_bytes(memoryview(config.get_timing_cache().serialize()))
    return serialized


def _int8_source(onnx_path, meta: dict, calibration: np.ndarray | None, tmp: str) -> str:
    """The export quantised to symmetric int8 Q/DQ (the only form TensorRT takes), calibrated on ``calibration``."""
    import shutil

    from scdino.export.quantize import quantize

    qdq = os.path.join(tmp, "qdq.onnx")
    shutil.copy(str(onnx_path), os.path.join(tmp, "src.onnx"))
    write_sidecar(os.path.join(tmp, "src.onnx"), meta)
    quantize(os.path.join(tmp, "src.onnx"), qdq, method="static", calibration=calibration, target="tensorrt")
    return qdq


def pin_sensitive_layers(trt, network) -> int:
    """Pin to fp32, by their output types: every layer before the patch-embedding convolution that makes a float
    tensor (the preprocessing: casts, min-max scaling's ``Where`` with its bool condition, the resize), and the
    normalisation layers after it. Shape and integer layers keep their types; softmax is left to TensorRT (fused
    attention). Returns the number of layers pinned."""
    floats = (trt.float32, trt.float16)
    norm = getattr(trt.LayerType, "NORMALIZATION", None)
    before_conv, pinned = True, 0
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        if layer.type == trt.LayerType.CONVOLUTION:
            before_conv = False
        outputs = [layer.get_output(j) for j in range(layer.num_outputs)]
        float_out = [j for j, t in enumerate(outputs) if t is not None and t.dtype in floats]
        if not float_out or not (before_conv or (norm is not None and layer.type == norm)):
            continue
        layer.precision = trt.float32
        for j in float_out:
            layer.set_output_type(j, trt.float32)
        pinned += 1
    return pinned


def inspect_precisions(trt, logger, plan: bytes) -> dict[str, int] | None:
    """How many of the built engine's layers compute in each precision, as TensorRT's engine inspector reports it
    (None where this TensorRT has no inspector)."""
    import json

    try:
        runtime = trt.Runtime(logger)
        engine = runtime.deserialize_cuda_engine(plan)
        info = json.loads(engine.create_engine_inspector().get_engine_information(trt.LayerInformationFormat.JSON))
    except Exception as exc:  # an older TensorRT, or no detailed profiling
        log.warning("TensorRT's engine inspector gave nothing (%s); the sidecar records the precision asked for", exc)
        return None
    return count_layer_precisions(info.get("Layers", []))


def count_layer_precisions(layers: list) -> dict[str, int]:
    """Layer counts by output precision from the inspector's JSON layers (``Outputs[].Format/Datatype``)."""
    counts = {"fp32": 0, "fp16": 0, "int8": 0, "other": 0}
    for layer in layers:
        if not isinstance(layer, dict):
            continue
        fmt = " ".join(str(o.get("Format/Datatype", "")) for o in layer.get("Outputs", []) if isinstance(o, dict))
        words = set(re.findall(r"[A-Z0-9]+", fmt.upper()))  # whole words: UINT8 is not INT8
        key = (
            "int8"
            if "INT8" in words
            else "fp16"
            if words & {"FP16", "HALF"}
            else "fp32"
            if words & {"FP32", "FLOAT", "KFLOAT"}
            else "other"
        )
        counts[key] += 1
    return counts


def dominant_precision(counts: dict[str, int] | None) -> str | None:
    """The lowest precision that most compute layers run in: int8 if any layer is int8, else fp16 if at least as many
    layers are fp16 as fp32, else fp32 (None when unknown)."""
    if not counts or not (counts["fp32"] + counts["fp16"] + counts["int8"]):
        return None
    if counts["int8"]:
        return "int8"
    return "fp16" if counts["fp16"] >= counts["fp32"] else "fp32"
