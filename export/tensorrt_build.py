"""TensorRT engines (``.plan``) built on the GPU that will run them, with NVIDIA's Python builder API.

* an optimisation profile for the batch axis (1 .. ``max_batch``, tuned for ``opt_batch``), crop size fixed;
* a timing cache beside the plan (``.timing.cache``) so that rebuilding on the same GPU is fast;
* ``fp16``: on TensorRT 10 (weakly typed networks) the FP16 flag with preprocessing, reductions, normalisation
  and softmax layers held in fp32; on TensorRT >= 11 (networks always strongly typed) the precision comes from the
  ONNX file, so build from an ``--precision fp16`` export (its LayerNorm and preprocessing are fp32 by construction);
* ``int8``: explicit quantisation: the ONNX is first quantised to Q/DQ with calibration crops
  (:func:`scdino.export.quantize.quantize`, static), then built;
* TensorRT has no uint16 tensors: a uint16 graph input becomes int32 (crops are widened on the host, still far
  smaller than the float model input);
* the sidecar records the GPU name, compute capability and TensorRT version;
  :func:`scdino.models.plan.check_plan` refuses a plan built elsewhere, with the command to rebuild it here.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from scdino._optional import require
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


def build_engine(
    onnx_path: str | os.PathLike,
    out: str | os.PathLike,
    fp16: bool = False,
    int8: bool = False,
    calibration: np.ndarray | None = None,
    max_batch: int = 256,
    opt_batch: int = 64,
    workspace_gb: float = 4.0,
    timing_cache: str | None = None,
) -> dict:
    """Build a TensorRT plan from an exported ONNX model. Returns the plan's sidecar."""
    trt = require("tensorrt")
    meta = read_sidecar(onnx_path)
    gpu = gpu_identity()
    major = int(trt.__version__.split(".")[0])
    weakly_typed = major < 11 and hasattr(trt.BuilderFlag, "FP16")
    if fp16 and meta["precision"] != "fp16" and not weakly_typed:
        raise ConfigError(
            f"TensorRT {trt.__version__} takes precisions from the ONNX file: export with "
            f"'scdino-export onnx ... --precision fp16' and build from that file"
        )
    if meta.get("attention_output"):
        raise ConfigError(
            f"{onnx_path}: exported with --attention; build plans from an export without it (the "
            "engine's TensorRT backend reads the CLS output only; attention maps run on PyTorch)"
        )
    if int8 and meta["precision"] != "fp32":
        raise ConfigError(f"{onnx_path}: int8 is built from an fp32 export, not {meta['precision']}")
    max_batch, opt_batch = int(max_batch), int(min(opt_batch, max_batch))
    out = claim_file(out, inputs=[onnx_path])
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        src = str(onnx_path)
        if int8:
            from scdino.export.quantize import quantize

            qdq = os.path.join(tmp, "qdq.onnx")
            import shutil

            shutil.copy(src, os.path.join(tmp, "src.onnx"))
            write_sidecar(os.path.join(tmp, "src.onnx"), meta)
            quantize(os.path.join(tmp, "src.onnx"), qdq, method="static", calibration=calibration, target="tensorrt")
            src = qdq
        widened = os.path.join(tmp, "input.onnx")
        _widen_uint16_input(src, widened)
        logger = trt.Logger(trt.Logger.WARNING)
        builder = trt.Builder(logger)
        network = builder.create_network(0)
        parser = trt.OnnxParser(network, logger)
        if not parser.parse_from_file(widened):
            errs = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise ScdinoError(f"{onnx_path}: TensorRT cannot parse the ONNX graph: {errs}")
        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
        cache_path = Path(timing_cache) if timing_cache else out.with_suffix(".timing.cache")
        cache = config.create_timing_cache(cache_path.read_bytes() if cache_path.is_file() else b"")
        config.set_timing_cache(cache, ignore_mismatch=False)
        if fp16 and weakly_typed and meta["precision"] == "fp32":
            config.set_flag(trt.BuilderFlag.FP16)
            config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
            _keep_sensitive_layers_fp32(trt, network)
        if int8 and weakly_typed:
            config.set_flag(trt.BuilderFlag.INT8)
        inp = network.get_input(0)
        c, s = meta["in_chans"], meta["crop_size"]
        profile = builder.create_optimization_profile()
        profile.set_shape(inp.name, (1, c, s, s), (opt_batch, c, s, s), (max_batch, c, s, s))
        config.add_optimization_profile(profile)
        serialized = builder.build_serialized_network(network, config)
        if serialized is None:
            raise ScdinoError(f"{onnx_path}: TensorRT could not build an engine (see the TensorRT log above)")
        tmp_plan = out.with_name(out.name + ".partial")
        tmp_plan.write_bytes(memoryview(serialized))
        os.replace(tmp_plan, out)
        cache_path.write_bytes(memoryview(config.get_timing_cache().serialize()))
    pmeta = {
        **meta,
        "precision": "int8" if int8 else "fp16" if fp16 or meta["precision"] == "fp16" else "fp32",
        "source_onnx": str(onnx_path),
        "input_dtype": "int32" if meta["dtype"] == "uint16" else meta["dtype"],
        "tensorrt": {
            "version": trt.__version__,
            **gpu,
            "max_batch": max_batch,
            "opt_batch": opt_batch,
            "fp16": fp16,
            "int8": int8,
            "build_seconds": round(time.perf_counter() - t0, 1),
            "timing_cache": str(cache_path),
        },
    }
    write_sidecar(out, pmeta)
    return pmeta


def _keep_sensitive_layers_fp32(trt, network) -> None:
    """Preprocessing (everything before the patch-embedding convolution), reductions, normalisation, softmax."""
    sensitive = {trt.LayerType.REDUCE, trt.LayerType.SOFTMAX, trt.LayerType.RESIZE}
    if hasattr(trt.LayerType, "NORMALIZATION"):
        sensitive.add(trt.LayerType.NORMALIZATION)
    before_conv = True
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        if layer.type == trt.LayerType.CONVOLUTION:
            before_conv = False
        floats = (trt.float32, trt.float16)
        if layer.num_inputs and layer.get_input(0) is not None and layer.get_input(0).dtype not in floats:
            continue  # shape and integer layers keep their types
        if before_conv or layer.type in sensitive:
            layer.precision = trt.float32
            for j in range(layer.num_outputs):
                if layer.get_output(j).dtype in (trt.float32, trt.float16):
                    layer.set_output_type(j, trt.float32)
