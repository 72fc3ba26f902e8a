"""Verification of an exported graph against the PyTorch path: part of every export, never optional. torch is
imported by the comparison that needs it, not by this module (``compare`` and ``fit_crops`` serve int8 checks too)."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import numpy as np

from scdino.data import packaged_crops
from scdino.errors import ScdinoError

if TYPE_CHECKING:
    from scdino.models.loader import LoadedModel

log = logging.getLogger(__name__)

#: default tolerances per precision: the largest absolute difference of any CLS value, the smallest cosine per crop
TOLERANCE = {"fp32": {"max_abs_diff": 1e-3, "min_cosine": 0.99999}, "fp16": {"max_abs_diff": None, "min_cosine": 0.999}}


class VerificationError(ScdinoError):
    """The exported graph does not reproduce the PyTorch embeddings within the tolerance."""


def fit_crops(crops: np.ndarray, n_channels: int, size: int, dtype: str) -> np.ndarray:
    """Cycle channels to ``n_channels``, centre-crop or zero-pad to ``size``, convert to ``dtype``."""
    c = crops[:, [i % crops.shape[1] for i in range(n_channels)]]
    s = c.shape[-1]
    if s > size:
        o = (s - size) // 2
        c = c[..., o : o + size, o : o + size]
    elif s < size:
        o = (size - s) // 2
        c = np.pad(c, ((0, 0), (0, 0), (o, size - s - o), (o, size - s - o)))
    if dtype == "uint8":
        return (c.astype(np.uint32) >> 8).astype(np.uint8) if c.dtype == np.uint16 else c.astype(np.uint8)
    return c.astype(np.dtype(dtype))


def edge_cases(real: np.ndarray) -> np.ndarray:
    """A constant channel, saturated pixels, an all-constant crop, a crop of the dtype's extremes."""
    top = np.iinfo(real.dtype).max if np.issubdtype(real.dtype, np.integer) else 1.0
    e = real[:4].copy()
    e[0, 0] = e[0, 0].flat[0]  # one constant channel
    e[1, :, 10:30, 10:30] = top  # saturated region
    e[2] = 7  # every channel constant
    e[3] = 0
    e[3, :, ::2] = top  # extremes only
    return e


def _torch_path(lm: LoadedModel, crops: np.ndarray, attention: bool):
    import torch  # the PyTorch side of the comparison (quantize and the engine use this module without torch)

    from scdino.preprocess_ops import apply

    with torch.inference_mode():
        x = apply(torch.from_numpy(crops.astype(np.float32)), lm.prep)
        if attention:
            cls, att = lm.model.forward_with_attention(x)
            return cls.numpy(), att.numpy()
        return lm.model(x).numpy(), None


def compare(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """(max abs difference, min cosine per row) of two (n, D) arrays."""
    diff = float(np.abs(a.astype(np.float64) - b).max())
    na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
    cos = (a.astype(np.float64) * b).sum(1) / np.maximum(na * nb, 1e-30)
    return diff, float(cos.min())


def verify(
    onnx_path: str, lm: LoadedModel, meta: dict, crops: np.ndarray | None = None, tolerance: dict | None = None
) -> dict:
    """Run ONNX Runtime (CPU) on real crops and edge cases; compare with PyTorch; raise above the tolerance."""
    import onnxruntime as ort

    tol = {**TOLERANCE[meta["precision"]], **(tolerance or {})}
    c, size, dtype = meta["in_chans"], meta["crop_size"], meta["dtype"]
    real = fit_crops(packaged_crops() if crops is None else crops, c, size, dtype)
    batches = {"real crops": real, "edge cases": edge_cases(real), "single crop": real[:1]}
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    sess = ort.InferenceSession(onnx_path, opts, providers=["CPUExecutionProvider"])
    report: dict = {
        "provider": "CPUExecutionProvider",
        "onnxruntime": ort.__version__,
        "tolerance": tol,
        "n_real_crops": int(len(real)),
        "source": "given crops" if crops is not None else "packaged",
    }
    worst_diff, worst_cos = 0.0, 1.0
    for name, batch in batches.items():
        outs = sess.run(None, {"crops": batch})
        want, want_att = _torch_path(lm, batch, meta["attention_output"])
        d, cmin = compare(outs[0], want)
        report[name] = {"max_abs_diff": d, "min_cosine": cmin}
        if want_att is not None:
            report[name]["attention_max_abs_diff"] = float(np.abs(outs[1] - want_att).max())
        worst_diff, worst_cos = max(worst_diff, d), min(worst_cos, cmin)
    report["max_abs_diff"], report["min_cosine"] = worst_diff, worst_cos
    bad = (tol["max_abs_diff"] is not None and worst_diff > tol["max_abs_diff"]) or worst_cos < tol["min_cosine"]
    report["passed"] = not bad
    if bad:
        raise VerificationError(
            f"{onnx_path}: ONNX Runtime differs from PyTorch (max abs {worst_diff:.3g}, min cosine {worst_cos:.6f}; "
            f"tolerance {tol}); the export is not written. Report this with the model and the options used"
        )
    return report
