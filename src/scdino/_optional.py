"""Lazy imports of optional dependencies, with the pip extra to install in the error message."""

from __future__ import annotations

import importlib
from functools import lru_cache
from pathlib import Path
from types import ModuleType

from scdino.errors import ScdinoError

#: module name -> (pip extra, what it is needed for)
EXTRAS: dict[str, tuple[str, str]] = {
    "tifffile": ("tiff", "reading TIFF images (LoadData CSV sources, crop folders, sample images)"),
    "ome_zarr": ("samples", "writing OME-Zarr sample plates"),
    "ndev_sampledata": ("samples", "the sample plates"),
    "onnx": ("onnx", "reading ONNX models"),
    "onnxruntime": ("onnx", "the ONNX Runtime backend"),
    "tensorrt": ("trt", "the TensorRT backend"),
    "cuml": ("gpu", "GPU UMAP"),
}


@lru_cache(maxsize=1)
def source_checkout() -> Path | None:
    """The source checkout scdino runs from (an editable install: ``pip install -e .``), else None (a wheel)."""
    import scdino

    root = Path(scdino.__file__).resolve().parents[2]
    try:
        project = (root / "pyproject.toml").read_text()
    except OSError:
        return None
    return root if 'name = "scdino"' in project else None


def pip_extra(extra: str) -> str:
    """How to install the pip extra ``extra`` in this installation: ``pip install 'scdino[trt]'`` for a wheel; in a
    source checkout ``pip install -e '.[trt]'`` run there (the package index's scdino is not this one)."""
    root = source_checkout()
    if root is None:
        return f"pip install 'scdino[{extra}]'"
    return f"pip install -e '.[{extra}]' in {root} (a source checkout)"


class MissingDependencyError(ScdinoError):
    """An optional dependency is not installed."""


def require(module: str) -> ModuleType:
    """Import ``module`` or raise :class:`MissingDependencyError` naming the extra that provides it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        extra, purpose = EXTRAS.get(module.split(".")[0], (None, "this feature"))
        hint = pip_extra(extra) if extra else f"pip install {module.split('.')[0]}"
        raise MissingDependencyError(
            f"{module} is needed for {purpose} but cannot be imported ({exc}); run: {hint}"
        ) from exc
