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

#: backends this release implements, in the order ``auto`` prefers them
KINDS = ("torch",)


@dataclass(frozen=True)
class BackendSpec:
    """Everything a worker needs to open the same backend (picklable, hashable)."""

    model: str
    n_channels: int
    input_size: int = 224
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


def resolve(kind: str, device: str) -> tuple[str, str]:
    """Turn ``auto`` into a concrete (backend, device) and say which."""
    if device not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"unknown device {device!r}; expected auto, cpu or cuda")
    if device == "auto":
        device = "cuda" if cuda_available() else "cpu"
    elif device == "cuda" and not cuda_available():
        raise ConfigError("--device cuda was asked for but PyTorch sees no CUDA GPU; use --device cpu")
    if kind == "auto":
        kind = KINDS[0]
        log.info("backend auto -> %s on %s", kind, device)
    elif kind not in KINDS:
        raise ConfigError(f"unknown backend {kind!r}; this installation offers: auto, {', '.join(KINDS)}")
    return kind, device


def open_backend(spec: BackendSpec) -> Backend:
    if spec.kind == "torch":
        from scdino.engine.backends.torch_backend import TorchBackend

        return TorchBackend(spec)
    raise ConfigError(f"unknown backend {spec.kind!r}")


_CACHE: dict[BackendSpec, Backend] = {}
_LOCK = threading.Lock()


def get_backend(spec: BackendSpec) -> Backend:
    """The backend for ``spec`` in this process, opened on first use."""
    with _LOCK:
        b = _CACHE.get(spec)
        if b is None:
            log.info("opening %s backend in process %d", spec.kind, os.getpid())
            b = _CACHE[spec] = open_backend(spec)
        return b


def close_all() -> None:
    with _LOCK:
        for b in _CACHE.values():
            b.close()
        _CACHE.clear()
