"""Inference backends behind one small protocol (open, infer(raw crops) -> embeddings, close).

Every backend takes *raw* crops (batch, C, S, S) in the plate's dtype and does the preprocessing of
:mod:`scdino.preprocess` itself, as late as possible and on its device, so only raw crops move.
:func:`get_backend` opens a backend once per process (once per Dask worker) and reuses it for every block.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import asdict, dataclass
from typing import Any, Protocol

import numpy as np

from scdino.errors import ConfigError, InputError

log = logging.getLogger(__name__)

#: backends this release implements
KINDS = ("torch", "onnxruntime", "tensorrt")


@dataclass(frozen=True)
class BackendSpec:
    """Everything a worker needs to open the same backend (picklable, hashable)."""

    model: str
    n_channels: int
    input_size: int | None = None
    checkpoint_key: str | None = "teacher"
    adapt: str = "mean"
    kind: str = "torch"
    device: str = "cpu"
    batch_size: int = 64
    threads: int | None = None
    seed: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


class Backend(Protocol):
    name: str
    embed_dim: int
    info: dict[str, Any]

    def infer(self, crops: np.ndarray) -> np.ndarray:
        """Embeddings (n, embed_dim) float32 of raw crops (n, C, S, S)."""

    def close(self) -> None: ...


def check_crops(crops: np.ndarray, n_channels: int) -> None:
    """Shared input check of every backend."""
    if crops.ndim != 4 or crops.shape[1] != n_channels or crops.shape[2] != crops.shape[3]:
        raise InputError(f"crops of shape {crops.shape}; expected (n, {n_channels}, S, S)")
    if not (np.issubdtype(crops.dtype, np.integer) or np.issubdtype(crops.dtype, np.floating)):
        raise InputError(f"crops of dtype {crops.dtype}; expected integer or float pixels")


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def model_format(model: str) -> str:
    """``plan`` (TensorRT), ``onnx`` or ``checkpoint`` (anything PyTorch loads: file, hub name, random:ARCH)."""
    low = str(model).lower()
    return "plan" if low.endswith((".plan", ".engine")) else "onnx" if low.endswith(".onnx") else "checkpoint"


def _ort_has_cuda() -> bool:
    try:
        from scdino.engine.backends.onnxruntime_backend import import_ort

        return "CUDAExecutionProvider" in import_ort().get_available_providers()
    except ConfigError:
        return False


def resolve(kind: str, device: str, model: str = "") -> tuple[str, str]:
    """Turn ``auto`` into a concrete (backend, device) for MODEL and log the choice.

    The backend follows MODEL's format: a ``.plan`` runs on TensorRT, an ``.onnx`` on ONNX Runtime (CUDA when
    onnxruntime-gpu and a GPU are there, else CPU), a checkpoint on PyTorch (CUDA when there is a GPU). Exporting to
    a faster format is an explicit, verified step (``scdino-export``), never done behind the user's back.
    """
    if device not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"unknown device {device!r}; expected auto, cpu or cuda")
    gpu = cuda_available()
    if device == "cuda" and not gpu:
        raise ConfigError("--device cuda was asked for but PyTorch sees no CUDA GPU; use --device cpu")
    fmt = model_format(model)
    native = {"plan": "tensorrt", "onnx": "onnxruntime", "checkpoint": "torch"}[fmt]
    if kind not in ("auto", *KINDS):
        raise ConfigError(f"unknown backend {kind!r}; expected auto, {', '.join(KINDS)}")
    if kind != "auto" and kind != native:
        hint = {
            "onnxruntime": f"export it first: scdino-export onnx {model} --out model.onnx",
            "tensorrt": "export it and build a plan: scdino-export onnx ... then scdino-export tensorrt ...",
            "torch": "pass the checkpoint the model was exported from",
        }[kind]
        raise ConfigError(f"--backend {kind} cannot run {model} (a {fmt} model); {hint}")
    if device == "auto":
        if fmt == "plan":
            device = "cuda" if gpu else "cpu"
        elif fmt == "onnx":
            device = "cuda" if gpu and _ort_has_cuda() else "cpu"
        else:
            device = "cuda" if gpu else "cpu"
    if fmt == "plan" and device != "cuda":
        raise ConfigError(f"{model}: a TensorRT plan runs on an NVIDIA GPU only; use the .onnx on the CPU")
    if kind == "auto":
        log.info("backend auto -> %s on %s", native, device)
    return native, device


def open_backend(spec: BackendSpec) -> Backend:
    if spec.kind == "torch":
        from scdino.engine.backends.torch_backend import TorchBackend

        return TorchBackend(spec)
    if spec.kind == "onnxruntime":
        from scdino.engine.backends.onnxruntime_backend import OnnxRuntimeBackend

        return OnnxRuntimeBackend(spec)
    if spec.kind == "tensorrt":
        from scdino.engine.backends.tensorrt_backend import TensorRTBackend

        return TensorRTBackend(spec)
    raise ConfigError(f"unknown backend {spec.kind!r}")


_CACHE: dict[BackendSpec, Backend] = {}
_LOCK = threading.Lock()


def get_backend(spec: BackendSpec) -> Backend:
    """The backend for ``spec`` in this process, opened on first use."""
    with _LOCK:
        b = _CACHE.get(spec)
        if b is None:
            while len(_CACHE) >= 2:  # e.g. evaluate's model x channel-set grid: keep memory bounded
                old = next(iter(_CACHE))
                _CACHE.pop(old).close()
            log.info("opening %s backend in process %d", spec.kind, os.getpid())
            b = _CACHE[spec] = open_backend(spec)
        return b


def close_all() -> None:
    with _LOCK:
        for b in _CACHE.values():
            b.close()
        _CACHE.clear()
