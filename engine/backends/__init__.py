"""Inference backends behind one small protocol (open, infer(raw crops) -> embeddings, close).

:mod:`~scdino.engine.backends.base` holds the protocol, :class:`BackendSpec` and the shared input check; each backend
lives in its own module and is registered in :data:`REGISTRY` (imported only when used). :func:`resolve` turns
``auto`` into a concrete backend and device for a model; :func:`using` opens a backend once per process (once per
Dask worker), reuses it for every block, and closes one to make room only when no thread is using it.
"""

from __future__ import annotations

import importlib
import logging
import os
import threading
from contextlib import contextmanager
from typing import Iterator

from scdino.engine.backends.base import DEFAULT_BATCH_SIZE, Backend, BackendSpec, check_crops
from scdino.errors import ConfigError
from scdino.models.card import FORMATS, model_format

log = logging.getLogger(__name__)

__all__ = ["DEFAULT_BATCH_SIZE", "KINDS", "REGISTRY", "Backend", "BackendSpec", "check_crops", "resolve", "using"]

#: backend name -> "module:class", imported on first use
REGISTRY = {
    "torch": "scdino.engine.backends.torch_backend:TorchBackend",
    "onnxruntime": "scdino.engine.backends.onnxruntime_backend:OnnxRuntimeBackend",
    "tensorrt": "scdino.engine.backends.tensorrt_backend:TensorRTBackend",
}
KINDS = tuple(REGISTRY)
#: backends never chosen by name on the command line: ``null`` (zeros, for pipeline benchmarks; SCDINO_NULL_BACKEND)
HIDDEN = {"null": "scdino.engine.backends.null_backend:NullBackend"}


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def _ort_has_cuda() -> bool:
    """Whether ONNX Runtime can really run on CUDA here (listed providers are not enough: their libraries may be
    missing, and ORT then falls back to the CPU with only a log line)."""
    try:
        from scdino.engine.backends.onnxruntime_backend import cuda_works

        return cuda_works()
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
    native = FORMATS[fmt]
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
        if fmt == "onnx":
            device = "cuda" if gpu and _ort_has_cuda() else "cpu"
        else:
            device = "cuda" if gpu else "cpu"
    if fmt == "plan" and device != "cuda":
        raise ConfigError(f"{model}: a TensorRT plan runs on an NVIDIA GPU only; use the .onnx on the CPU")
    if kind == "auto":  # the run logs the path it finally takes, once (the export cache may change it)
        log.debug("backend auto -> %s on %s", native, device)
    return native, device


def open_backend(spec: BackendSpec) -> Backend:
    """A new backend for ``spec`` (see :data:`REGISTRY`)."""
    where = REGISTRY.get(spec.kind) or HIDDEN.get(spec.kind)
    if where is None:
        raise ConfigError(f"unknown backend {spec.kind!r}; expected one of {', '.join(KINDS)}")
    module, cls = where.split(":")
    return getattr(importlib.import_module(module), cls)(spec)


_CACHE: dict[BackendSpec, Backend] = {}
_USERS: dict[BackendSpec, int] = {}
_LOCK = threading.Lock()
#: backends kept open per process (e.g. evaluate's model x channel-set grid: memory stays bounded)
CACHE_SIZE = 2


@contextmanager
def using(spec: BackendSpec) -> Iterator[Backend]:
    """The backend for ``spec`` in this process (opened on first use), held while the body runs: a backend is closed to
    make room for another only when no thread is using it."""
    with _LOCK:
        b = _CACHE.get(spec)
        if b is None:
            log.info("opening %s backend in process %d", spec.kind, os.getpid())
            b = _CACHE[spec] = open_backend(spec)
        _USERS[spec] = _USERS.get(spec, 0) + 1
    try:
        yield b
    finally:
        with _LOCK:
            _USERS[spec] -= 1
            _evict_idle()


def _evict_idle() -> None:
    """Close the oldest idle backends until at most :data:`CACHE_SIZE` stay open (busy ones are never closed)."""
    for old in list(_CACHE):
        if len(_CACHE) <= CACHE_SIZE:
            return
        if _USERS.get(old, 0) == 0:
            _CACHE.pop(old).close()
            _USERS.pop(old, None)
