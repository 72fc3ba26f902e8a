"""Lazy imports of optional dependencies, with the pip extra to install in the error message."""

from __future__ import annotations

import importlib
from types import ModuleType

from scdino.errors import ScdinoError

#: module name -> (pip extra, what it is needed for)
EXTRAS: dict[str, tuple[str, str]] = {
    "tifffile": ("samples", "reading the sample images"),
    "ome_zarr": ("samples", "writing OME-Zarr sample plates"),
    "ndev_sampledata": ("samples", "the sample plates"),
    "onnx": ("onnx", "reading ONNX models"),
    "onnxruntime": ("onnx", "the ONNX Runtime backend"),
    "tensorrt": ("trt", "the TensorRT backend"),
    "cuml": ("gpu", "GPU UMAP"),
}


class MissingDependencyError(ScdinoError):
    """An optional dependency is not installed."""


def require(module: str) -> ModuleType:
    """Import ``module`` or raise :class:`MissingDependencyError` naming the extra that provides it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        extra, purpose = EXTRAS.get(module.split(".")[0], (None, "this feature"))
        hint = f"pip install 'scdino[{extra}]'" if extra else f"pip install {module.split('.')[0]}"
        raise MissingDependencyError(
            f"{module} is needed for {purpose} but cannot be imported ({exc}); run: {hint}"
        ) from exc
