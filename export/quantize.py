"""int8 ONNX for CPU PCs with onnxruntime.quantization.

Dynamic quantisation of the MatMul/Gemm weights after ``quant_pre_process``, in the first of :data:`DYNAMIC_FORMS`
this CPU may run that keeps cosine >= :data:`FAST_FORM_MIN_COSINE` to fp32 on the check crops (else the most accurate
one): signed per-channel weights (ONNX Runtime's u8 x s8 kernels, 1.2-1.6x faster than unsigned weights here) on 8
bits where the CPU has VNNI, on 7 bits elsewhere (full 8-bit signed weights saturate the int16 sums of older AVX2
CPUs: cosine 0.90-0.94), then unsigned per-tensor weights (``QUInt8``). ``method="static"`` calibrates activations
on real crops (QDQ format) instead; the report says which is better.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time

import numpy as np

from scdino.cpu import has_vnni
from scdino.data import packaged_crops
from scdino.errors import ConfigError
from scdino.export.verify import VerificationError, compare, fit_crops
from scdino.knn import K, dominant_channel_labels, knn_predict
from scdino.models.card import check_onnx_file
from scdino.models.checkpoint import sha256_of
from scdino.models.sidecar import check_identity, read_sidecar, with_file_hash, write_sidecar
from scdino.outputs import claim_file, partial_file

log = logging.getLogger(__name__)


def _session(path: str, threads: int | None = None):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = threads or 0
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])


def _embed(sess, crops: np.ndarray, batch: int = 16) -> np.ndarray:
    return np.concatenate([sess.run(["cls"], {"crops": crops[i : i + batch]})[0] for i in range(0, len(crops), batch)])


#: dynamic int8 forms in the order they are tried: (name, quantize_dynamic's options, needs a VNNI-class CPU).
#: Signed weights run 1.2-1.6x faster than unsigned ones here; on 8 bits they are the most accurate but saturate the
#: 16-bit sums of CPUs without VNNI (scdino.cpu), so there the 7-bit form is the first. benchmarks/int8_forms.py
DYNAMIC_FORMS = (
    ("int8 per channel, 8 bit", {"weight_type": "QInt8", "per_channel": True}, True),
    ("int8 per channel, 7 bit", {"weight_type": "QInt8", "per_channel": True, "reduce_range": True}, False),
    ("uint8", {"weight_type": "QUInt8"}, False),
)


def dynamic_forms(vnni: bool | None = None) -> list[tuple[str, dict, bool]]:
    """The forms this CPU may run (``vnni`` None: ask :func:`scdino.cpu.has_vnni`)."""
    vnni = has_vnni() if vnni is None else vnni
    return [f for f in DYNAMIC_FORMS if vnni or not f[2]]


#: the cosine to fp32 a faster dynamic form must keep on every check crop to be chosen over the next one
FAST_FORM_MIN_COSINE = 0.999


class _Reader:
    """CalibrationDataReader over crops."""

    def __init__(self, crops: np.ndarray, batch: int = 8) -> None:
        self.batches = iter([{"crops": crops[i : i + batch]} for i in range(0, len(crops), batch)])

    def get_next(self):
        return next(self.batches, None)


def _check(dest: str, ref: np.ndarray, crops: np.ndarray, tmp: str) -> tuple[np.ndarray, tuple[float, float]]:
    """Embeddings of the int8 model at ``dest`` (run from a copy, so ``dest`` can be rewritten) and their
    (max abs diff, min cosine) to ``ref``."""
    check = os.path.join(tmp, "check.onnx")
    shutil.copy(dest, check)
    q = _embed(_session(check), crops)
    return q, compare(q, ref)


def quantize(
    model: str | os.PathLike,
    out: str | os.PathLike,
    method: str = "dynamic",
    calibration: np.ndarray | None = None,
    target: str = "cpu",
    min_cosine: float = 0.99,
) -> dict:
    """Write an int8 copy of an exported fp32 model and its sidecar with the quality report.

    ``target="tensorrt"`` (static only) writes symmetric signed int8 Q/DQ, the only form TensorRT accepts; ``"cpu"``
    uses unsigned activations and range-reduced weights, accurate on AVX2 CPUs. A copy whose cosine to fp32 falls below
    ``min_cosine`` on any check crop is not written.
    """
    from onnxruntime.quantization.shape_inference import quant_pre_process

    meta = read_sidecar(model)
    # a truncated or damaged file, or a graph its sidecar does not describe: one line before any work
    check_identity(model, meta, "onnx", sha256_of(model), check_onnx_file(str(model)))
    if meta.get("precision") != "fp32":
        raise ConfigError(f"{model}: quantise an fp32 export, not {meta.get('precision')}")
    if target not in ("cpu", "tensorrt") or (target == "tensorrt" and method != "static"):
        raise ConfigError(f"target {target!r} with method {method!r}: expected cpu, or tensorrt with static")
    if method not in ("dynamic", "static"):
        raise ConfigError(f"--method {method!r}: expected dynamic or static")
    crops = fit_crops(
        packaged_crops() if calibration is None else calibration, meta["in_chans"], meta["crop_size"], meta["dtype"]
    )
    saturated = saturated_fraction(crops, meta.get("preprocessing") or {})
    if saturated > SATURATED_WARN:
        log.warning(
            "%s: its fixed intensity range clips %.0f%% of the check crops' pixels (%s), so the quality report "
            "compares mostly flat images and says little about your cells. Pass --calibration with crops cut from "
            "the data the model was trained on (and export with --verify-crops from them)",
            model, 100 * saturated, "packaged neocortex crops" if calibration is None else "the given crops",
        )  # fmt: skip
    out = claim_file(out, inputs=[model])
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        pre = os.path.join(tmp, "pre.onnx")
        quant_pre_process(str(model), pre, skip_symbolic_shape=True)
        dest = os.path.join(tmp, "int8.onnx")
        ref = _embed(_session(str(model)), crops)
        if method == "dynamic":
            weights, tried, q, diff = _dynamic(pre, dest, ref, crops, tmp)
        else:
            weights, tried, q, diff = _static(pre, dest, ref, crops, tmp, target)
        cmin = tried[weights]
        if cmin < min_cosine:
            raise VerificationError(
                f"{model}: int8 ({method}) embeddings reach only cosine {cmin:.4f} to fp32 (need {min_cosine}); "
                "not written. "
                + ("Keep the fp32 model" if method == "dynamic" else "Use --method dynamic, or keep the fp32 model")
            )
        report = _report(method, target, weights, tried, crops, ref, q, diff, meta["in_chans"])
        report["seconds"] = round(time.perf_counter() - t0, 2)
        report["check_pixels_clipped"] = round(saturated, 4)
        qmeta = {**meta, "precision": "int8", "quantization": report, "source_onnx": str(model)}
        qmeta = with_file_hash(qmeta, "onnx", sha256_of(dest))
        # copied beside OUT, then moved into place after its sidecar: a full disk leaves no partial file
        with partial_file(out, out.with_name(out.stem + ".partial.onnx")) as part:
            shutil.copyfile(dest, part)
            write_sidecar(out, qmeta)
    acc = report["knn_leave_one_out_top1"]
    log.info("int8 (%s): min cosine to fp32 %.5f, k-NN %.3f -> %.3f", method, cmin, acc["fp32"], acc["int8"])
    return qmeta


def _dynamic(pre: str, dest: str, ref: np.ndarray, crops: np.ndarray, tmp: str):
    """Dynamic int8: each form of :func:`dynamic_forms` in turn (fastest first) until one keeps
    FAST_FORM_MIN_COSINE on every check crop, else the most accurate; written to ``dest``. Returns (the form, every
    tried form's min cosine, its embeddings, its max abs diff)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    made, tried = {}, {}  # form -> (file, embeddings, max abs diff); form -> min cosine
    for i, (form, options, _) in enumerate(dynamic_forms()):
        options = {**options, "weight_type": getattr(QuantType, options["weight_type"])}
        path = os.path.join(tmp, f"int8-{i}.onnx")
        quantize_dynamic(pre, path, op_types_to_quantize=["MatMul", "Gemm"], **options)
        q, (diff, tried[form]) = _check(path, ref, crops, tmp)
        made[form] = (path, q, diff)
        if tried[form] >= FAST_FORM_MIN_COSINE:
            break
        log.info("int8 %s: min cosine to fp32 %.5f < %s, trying the next", form, tried[form], FAST_FORM_MIN_COSINE)
    weights = next((f for f in tried if tried[f] >= FAST_FORM_MIN_COSINE), max(tried, key=tried.get))
    path, q, diff = made[weights]
    os.replace(path, dest)
    return weights, tried, q, diff


def _static(pre: str, dest: str, ref: np.ndarray, crops: np.ndarray, tmp: str, target: str):
    """Static int8 Q/DQ calibrated on ``crops``: symmetric signed activations for TensorRT, unsigned with
    range-reduced weights for CPUs. Returns as :func:`_dynamic`."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    trt_form = target == "tensorrt"
    quantize_static(
        pre,
        dest,
        _Reader(crops),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        activation_type=QuantType.QInt8 if trt_form else QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        reduce_range=not trt_form,
        op_types_to_quantize=["MatMul", "Gemm", "Conv"],
        extra_options={"ActivationSymmetric": True, "WeightSymmetric": True} if trt_form else {},
    )
    q, (diff, cmin) = _check(dest, ref, crops, tmp)
    return "int8 per channel", {"int8 per channel": cmin}, q, diff


#: the share of check pixels outside a model's fixed intensity range above which the quality report is warned of
SATURATED_WARN = 0.5


def saturated_fraction(crops: np.ndarray, preprocessing: dict) -> float:
    """The share of ``crops``' pixels (n, C, S, S) outside the fixed intensity range ``scale_lo..scale_hi`` per channel
    of a model's preprocessing (clipped to 0 or 1 before the network sees them); 0 for per-crop scaling."""
    lo, hi = preprocessing.get("scale_lo"), preprocessing.get("scale_hi")
    if lo is None or hi is None or not crops.size:
        return 0.0
    lo = np.asarray(lo, np.float64)[None, :, None, None]
    hi = np.asarray(hi, np.float64)[None, :, None, None]
    return float(((crops < lo) | (crops > hi)).mean())


def _report(method, target, weights, tried, crops, ref, q, diff, in_chans: int) -> dict:
    """The sidecar's quality report: cosine of every check crop to fp32, and leave-one-out k-NN (the protocol's k) on
    labels derived from the pixels, fp32 against int8."""
    cos = (q * ref).sum(1) / np.linalg.norm(q, axis=1) / np.linalg.norm(ref, axis=1)
    labels = dominant_channel_labels(crops) if in_chans > 1 else np.zeros(len(crops), int)
    acc = {
        name: float((knn_predict(emb, labels, emb, k=K, exclude_self=True) == labels).mean())
        for name, emb in (("fp32", ref), ("int8", q))
    }
    return {
        "method": method,
        "target": target,
        "weights": weights,
        "forms_tried": tried,
        # a full-range signed form saturates on CPUs without VNNI: the ONNX Runtime backend warns there
        "needs_vnni": any(f[2] for f in DYNAMIC_FORMS if f[0] == weights),
        "n_crops": int(len(crops)),
        "min_cosine_to_fp32": tried[weights],
        "median_cosine_to_fp32": float(np.median(cos)),
        "max_abs_diff": diff,
        "knn_leave_one_out_top1": acc,
        "knn_labels": "dominant channel of each crop (derived from pixels)",
    }
