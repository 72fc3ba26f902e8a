"""TensorRT engines (``.plan``) built on the GPU that will run them, with NVIDIA's Python builder API.

* an optimisation profile for the batch axis (1 .. ``max_batch``, tuned for ``opt_batch``: by default the batch the
  engine sends this model on a GPU, :func:`scdino.batches.plan_batches`), crop size fixed; the profile the built plan
  reports is recorded in the sidecar;
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
* the precision recorded in the sidecar is the one TensorRT's engine inspector reports for the built plan's layers
  that compute, read the same way on TensorRT 10 and 11 (:func:`scdino.export.tensorrt_plan.read_precision`, whose
  rule is in its docstring), not the one asked for; the sidecar says what was read from where;
* TensorRT has no uint16 tensors: a uint16 graph input becomes int32 (crops are widened on the host, still far
  smaller than the float model input); the sidecar records the input and output as the built plan declares them;
* the sidecar records the GPU name, compute capability and TensorRT version;
  :func:`scdino.models.plan.check_plan` refuses a plan built elsewhere, with the command to rebuild it here.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from scdino._optional import require
from scdino.batches import MAX_BATCH, plan_batches
from scdino.errors import ConfigError, ScdinoError
from scdino.export.tensorrt_plan import RULE, PlanIO, PrecisionReport, check_plan_io, inspect_engine, plan_io
from scdino.models.card import describe_model
from scdino.models.plan import gpu_identity
from scdino.models.sidecar import read_sidecar, with_file_hash, write_sidecar
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
    opt_batch: int | None = None,
    workspace_gb: float = 4.0,
    timing_cache: str | None = None,
) -> dict:
    """Build a TensorRT plan from an exported ONNX model. Returns the plan's sidecar.

    ``opt_batch`` None tunes the plan for the batch ``scdino-engine run`` sends this model on a GPU
    (:func:`scdino.batches.plan_batches`); the engine's TensorRT backend sends batches of the plan's opt size."""
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
    card = describe_model(str(onnx_path))
    batches = plan_batches(card.tokens, opt_batch, max_batch)
    if int8 and calibration is None:
        log.warning(
            "int8 without --calibration: the activation ranges come from 48 packaged neocortex nucleus crops, not "
            "from your plate; accuracy on other images may suffer. Pass --calibration crops.npy cut from your plate"
        )
    out = claim_file(out, inputs=[onnx_path])
    t0 = time.perf_counter()
    logger = trt.Logger(trt.Logger.WARNING)
    cache_path = Path(timing_cache) if timing_cache else out.with_suffix(".timing.cache")
    with tempfile.TemporaryDirectory() as tmp:
        src = _int8_source(onnx_path, meta, calibration, tmp) if int8 else str(onnx_path)
        widened = os.path.join(tmp, "input.onnx")
        _widen_uint16_input(src, widened)
        shapes = (meta["in_chans"], meta["crop_size"], batches)
        serialized = _serialize(trt, logger, widened, onnx_path, plan, shapes, workspace_gb, cache_path)
        tmp_plan = out.with_name(out.name + ".partial")
        tmp_plan.write_bytes(memoryview(serialized))
        os.replace(tmp_plan, out)
    asked = "int8" if int8 else "fp16" if fp16 or meta["precision"] == "fp16" else "fp32"
    io, report = _read_back(trt, logger, serialized, out, meta, onnx_path)
    pmeta = {
        **meta,
        "precision": (report and report.precision) or asked,
        "source_onnx": str(onnx_path),
        "input_dtype": io.input_dtype,
        "tensorrt": {
            "version": trt.__version__,
            **gpu,
            "max_batch": io.batches[2],
            "opt_batch": io.batches[1],
            "profile": {
                "min": io.batches[0],
                "opt": io.batches[1],
                "max": io.batches[2],
                "opt_from": "--opt-batch" if opt_batch is not None else f"gpu_batch_size({card.tokens} tokens)",
            },
            "io": io.to_dict(),
            "asked": asked,
            "precision_from": "engine inspector" if report and report.precision else "asked",
            "layer_precisions": report.layers if report else None,
            "precision_report": {**report.to_dict(), "rule": RULE} if report else None,
            "strongly_typed": plan.strongly_typed,
            "flags": list(plan.flags),
            "calibration": ("given crops" if calibration is not None else "packaged neocortex crops") if int8 else None,
            "build_seconds": round(time.perf_counter() - t0, 1),
            "timing_cache": str(cache_path),
        },
    }
    pmeta = with_file_hash(pmeta, "plan", hashlib.sha256(memoryview(serialized)).hexdigest())
    write_sidecar(out, pmeta)
    return pmeta


def _read_back(trt, logger, serialized, out: Path, meta: dict, onnx_path) -> tuple[PlanIO, PrecisionReport | None]:
    """The built plan as it declares itself: its tensors and profile (checked against the export's sidecar) and the
    precision its layers report."""
    runtime = trt.Runtime(logger)  # must outlive the engine
    engine = runtime.deserialize_cuda_engine(bytes(memoryview(serialized)))
    if engine is None:
        raise ScdinoError(f"{out}: TensorRT cannot load the plan it has just built (see the TensorRT log above)")
    io = plan_io(trt, engine, str(out))
    check_plan_io(io, expected_io(meta), str(out), str(onnx_path))
    report = inspect_engine(trt, engine)
    del engine  # before its runtime
    return io, report


def expected_io(meta: dict) -> dict:
    """What a plan built from the export of sidecar ``meta`` must declare (see
    :func:`scdino.export.tensorrt_plan.check_plan_io`): its graph's input and output names, channels, crop size and
    embedding width."""
    graph = meta.get("graph") or {}
    ins, outs = graph.get("inputs") or [{}], graph.get("outputs") or [{}]
    return {
        "input": ins[0].get("name", "crops"),
        "output": outs[0].get("name", "cls"),
        "channels": int(meta["in_chans"]),
        "crop_size": int(meta["crop_size"]),
        "width": int(meta["embed_dim"]),
    }


def _serialize(trt, logger, widened: str, onnx_path, plan: BuildPlan, shapes: tuple, workspace_gb: float, cache_path):
    """The serialized engine of the graph at ``widened``: parsed, built with ``plan``'s flags for (channels, crop
    size, (min, opt, max) batch) in ``shapes``, the timing cache read and written back."""
    c, s, (min_batch, opt_batch, max_batch) = shapes
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
    profile.set_shape(inp.name, (min_batch, c, s, s), (opt_batch, c, s, s), (max_batch, c, s, s))
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
