"""Inference backends behind one small protocol (open, infer(raw crops) -> embeddings, close).

:mod:`~scdino.engine.backends.base` holds the protocol, :class:`BackendSpec` and the shared input check; each backend
lives in its own module and is one :class:`BackendEntry` in :data:`REGISTRY` (its opener imported only when used): the
model format it runs, its devices and the advice when it cannot run a model. Everything else is derived from the
registry: the command line's ``--backend`` choices (:func:`choices`), :func:`resolve`, which turns ``auto`` into a
concrete backend and device for a model card, and :func:`open_backend`. :func:`using` opens a backend once per process
(once per Dask worker), reuses it for every block, and closes one to make room only when no thread is using it.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from scdino.engine.backends.base import (
    DEFAULT_BATCH_SIZE,
    REGISTRY,
    Backend,
    BackendEntry,
    BackendSpec,
    check_crops,
    register,
)
from scdino.engine.backends.null_backend import ENV as NULL_ENV
from scdino.errors import ConfigError
from scdino.models.card import FORMATS, ModelCard

log = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_BATCH_SIZE",
    "REGISTRY",
    "Backend",
    "BackendEntry",
    "BackendSpec",
    "check_crops",
    "choices",
    "open_backend",
    "register",
    "resolve",
    "using",
]


def choices() -> list[str]:
    """What ``--backend`` accepts: ``auto`` and every listed backend."""
    return ["auto", *(n for n, e in REGISTRY.items() if e.listed)]


def _ort_has_cuda() -> bool:
    """Whether ONNX Runtime can really run on CUDA here (listed providers are not enough: their libraries may be
    missing, and ORT then falls back to the CPU with only a log line)."""
    try:
        from scdino.engine.backends.onnxruntime_backend import cuda_works

        return cuda_works()
    except ConfigError:
        return False


register(BackendEntry("torch", "scdino.engine.backends.torch_backend:TorchBackend", ("checkpoint",),
                      hint="pass the checkpoint the model was exported from", autocast_on=("cuda",),
                      exports_to="onnxruntime", reads_checkpoint=True))  # fmt: skip
register(BackendEntry("onnxruntime", "scdino.engine.backends.onnxruntime_backend:OnnxRuntimeBackend", ("onnx",),
                      hint="export it first: scdino-export onnx {model} --out model.onnx",
                      cuda_works=lambda: _ort_has_cuda()))  # fmt: skip
register(BackendEntry("tensorrt", "scdino.engine.backends.tensorrt_backend:TensorRTBackend", ("plan",), ("cuda",),
                      hint="export it and build a plan: scdino-export onnx ... then scdino-export tensorrt ...",
                      cpu_hint="a TensorRT plan runs on an NVIDIA GPU only; use the .onnx on the CPU"))  # fmt: skip
#: zeros, for pipeline benchmarks (SCDINO_NULL_BACKEND=1); never on the command line, never chosen by auto
register(BackendEntry("null", "scdino.engine.backends.null_backend:NullBackend", FORMATS, listed=False,
                      grouped_on=("cpu", "cuda"), stand_in_env=NULL_ENV))  # fmt: skip


def _nvidia_device_files() -> bool:
    """Whether the NVIDIA driver shows a device here (Linux); True where this cannot be told (then PyTorch is asked)."""
    if os.environ.get("CUDA_VISIBLE_DEVICES") in ("", "-1"):
        return False
    if not sys.platform.startswith("linux"):
        return True
    gpus = Path("/proc/driver/nvidia/gpus")
    return (gpus.is_dir() and any(gpus.iterdir())) or any(Path("/dev").glob("nvidia[0-9]*"))


def cuda_available() -> bool:
    """Whether PyTorch sees a CUDA GPU. Without NVIDIA devices on the machine the answer is no without importing
    torch (a run on ONNX Runtime on a CPU never imports it)."""
    if "torch" not in sys.modules and not _nvidia_device_files():
        return False
    import torch

    return torch.cuda.is_available()


def _entry(kind: str, card: ModelCard) -> BackendEntry:
    """The backend ``kind`` names (``auto``: the one that runs the card's format natively), checked against it."""
    if kind == "auto":
        native = [e for e in REGISTRY.values() if e.listed and e.formats[0] == card.format]
        if not native:
            raise ConfigError(f"{card.spec}: no backend runs {card.format} models; expected one of {list(FORMATS)}")
        return native[0]
    entry = REGISTRY.get(kind)
    if entry is None:
        raise ConfigError(f"unknown backend {kind!r}; expected one of {', '.join(choices())}")
    if card.format not in entry.formats:
        hint = entry.hint.format(model=card.spec) or f"it runs {' or '.join(entry.formats)} models"
        raise ConfigError(f"--backend {kind} cannot run {card.spec} (a {card.format} model); {hint}")
    return entry


def resolve(kind: str, device: str, card: ModelCard) -> tuple[str, str]:
    """Turn ``auto`` into a concrete (backend, device) for the model of ``card`` and log the choice.

    The backend follows the model's format: a ``.plan`` runs on TensorRT, an ``.onnx`` on ONNX Runtime (CUDA when
    onnxruntime-gpu and a GPU are there, else CPU), a checkpoint on PyTorch (CUDA when there is a GPU). Exporting to
    a faster format is an explicit, verified step (``scdino-export``), never done behind the user's back.
    """
    if device not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"unknown device {device!r}; expected auto, cpu or cuda")
    entry = _entry(kind, card)
    gpu = cuda_available() if device != "cpu" else False
    if device == "cuda" and not gpu:
        raise ConfigError("--device cuda was asked for but PyTorch sees no CUDA GPU; use --device cpu")
    if device == "auto":
        usable = gpu and "cuda" in entry.devices and (entry.cuda_works is None or entry.cuda_works())
        device = "cuda" if usable else "cpu"
    if device not in entry.devices:
        raise ConfigError(f"{card.spec}: {entry.cpu_hint or f'the {entry.name} backend runs on {entry.devices}'}")
    if kind == "auto":  # the run logs the path it finally takes, once (the export cache may change it)
        log.debug("backend auto -> %s on %s", entry.name, device)
    return entry.name, device


def open_backend(spec: BackendSpec) -> Backend:
    """A new backend for ``spec`` (see :data:`REGISTRY`)."""
    entry = REGISTRY.get(spec.kind)
    opener = entry.opener if entry is not None else spec.opener  # a worker process: what the spec carries
    if not opener:
        raise ConfigError(f"unknown backend {spec.kind!r}; expected one of {', '.join(choices())}")
    if callable(opener):
        return opener(spec)
    module, cls = opener.split(":")
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
            log.info(  # one line per backend: a precision check opens fp32 and int8 copies of one model
                "opening %s backend (%s, %s) in process %d",
                spec.kind, os.path.basename(str(getattr(spec.card, "spec", ""))),
                spec.precision if spec.card is not None else "?", os.getpid(),
            )  # fmt: skip
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
