"""What every backend shares: the spec a worker opens it from, the protocol, and the one input check.

Every backend takes *raw* crops (batch, C, S, S) in the plate's dtype and does the preprocessing of
:mod:`scdino.preprocess` itself, as late as possible and on its device, so only raw crops move.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import numpy as np

from scdino.defaults import ADAPT, CHECKPOINT_KEY
from scdino.engine.config import DEFAULT_BATCH_SIZE, TTA_MODES
from scdino.errors import ConfigError, InputError
from scdino.models.card import FORMATS, ModelCard


@dataclass(frozen=True)
class BackendSpec:
    """Everything a worker needs to open the same backend (picklable, hashable: the cache key of a worker)."""

    card: ModelCard
    n_channels: int
    kind: str = "torch"
    device: str = "cpu"
    batch_size: int = DEFAULT_BATCH_SIZE
    threads: int | None = None
    checkpoint_key: str | None = CHECKPOINT_KEY
    adapt: str = ADAPT
    seed: int = 0
    #: PyTorch on CUDA: the autocast dtype, ``float16`` (the default) or ``bfloat16``
    autocast: str = "float16"
    #: test-time augmentation (:mod:`scdino.engine.tta`): a part of what the embeddings are, so of the resume check
    tta: str = "none"
    #: how a worker opens it: the registered ``"module:Class"`` of ``kind`` (a worker process may not have run the
    #: registration of a backend added from outside scdino; the spec carries it there)
    opener: str = field(default="", init=False)
    #: the devices where it autocasts (its entry's ``autocast_on``), carried for the same reason
    autocast_on: tuple[str, ...] = field(default=(), init=False)

    def __post_init__(self) -> None:
        if self.autocast not in ("float16", "bfloat16"):
            raise ConfigError(f"autocast {self.autocast!r}: expected float16 or bfloat16")
        if self.tta not in TTA_MODES:
            raise ConfigError(f"tta {self.tta!r}: expected {', '.join(TTA_MODES)}")
        entry = REGISTRY.get(self.kind)
        object.__setattr__(self, "opener", entry.opener if entry and isinstance(entry.opener, str) else "")
        object.__setattr__(self, "autocast_on", entry.autocast_on if entry else ())

    @property
    def model(self) -> str:
        return self.card.spec

    @property
    def entry(self) -> BackendEntry:
        """The registry's entry of :attr:`kind` (what the backend does differently is read there, never from its
        name)."""
        return entry_of(self.kind)

    @property
    def precision(self) -> str:
        """The precision the backend computes in: the card's, or the autocast dtype on the devices where the backend
        autocasts (PyTorch on CUDA: fp16, or bf16 with ``autocast="bfloat16"``)."""
        if self.device in self.autocast_on:
            return "bf16-autocast" if self.autocast == "bfloat16" else "fp16-autocast"
        return self.card.precision

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.card.spec,
            "n_channels": self.n_channels,
            "input_size": self.card.input_size,
            "checkpoint_key": self.checkpoint_key,
            "adapt": self.adapt,
            "kind": self.kind,
            "device": self.device,
            "batch_size": self.batch_size,
            "threads": self.threads,
            "seed": self.seed,
            # recorded where it is not the default, so that stores made before it existed resume
            **({"autocast": self.autocast} if self.autocast != "float16" else {}),
            **({"tta": self.tta} if self.tta != "none" else {}),
        }


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


@dataclass(frozen=True)
class BackendEntry:
    """One backend: how to open it and what it runs."""

    name: str
    #: ``"module:Class"`` (imported on first use, also in worker processes that never registered it) or a callable
    #: (in this process only); called with the :class:`BackendSpec`
    opener: str | Callable[[BackendSpec], Backend]
    #: the model formats it runs (see :data:`scdino.models.card.FORMATS`); ``auto`` picks the first registered,
    #: listed backend whose first format is the model's
    formats: tuple[str, ...]
    devices: tuple[str, ...] = ("cpu", "cuda")
    #: how to get a model it runs, when it is asked for one it cannot (``{model}`` is the model given)
    hint: str = ""
    #: why it cannot run on the CPU (backends without "cpu" in ``devices``)
    cpu_hint: str = ""
    #: whether ``auto`` may run this backend on CUDA here (called only where PyTorch sees a GPU)
    cuda_works: Callable[[], bool] | None = None
    #: listed on the command line and chosen by ``auto``; a hidden backend is chosen only by name in code
    listed: bool = True
    #: the devices where it computes in the spec's autocast dtype instead of the card's precision
    autocast_on: tuple[str, ...] = ()
    #: the devices where one task embeds several blocks (a GPU is kept busy by big tasks); elsewhere a task is a block
    grouped_on: tuple[str, ...] = ("cuda",)
    #: the backend the export cache may move its CPU runs to (a verified export of the card's checkpoint, where it
    #: measures faster); None: its runs stay on it
    exports_to: str | None = None
    #: it builds its model from the checkpoint the card was read from (a worker in this process reuses the one read)
    reads_checkpoint: bool = False
    #: an environment variable that, set to 1, puts this backend in place of the one a run chose (the null backend)
    stand_in_env: str = ""


#: backend name -> entry; :func:`register` adds one
REGISTRY: dict[str, BackendEntry] = {}


def entry_of(kind: str) -> BackendEntry:
    """The registered backend ``kind``; a clear error naming the choices for an unknown one."""
    entry = REGISTRY.get(kind)
    if entry is None:
        names = ", ".join(n for n, e in REGISTRY.items() if e.listed)
        raise ConfigError(f"unknown backend {kind!r}; expected one of auto, {names}")
    return entry


def stand_in(spec: BackendSpec) -> BackendSpec:
    """``spec`` on the backend whose :attr:`BackendEntry.stand_in_env` is set to 1, if any (a warning says so)."""
    import logging
    import os
    from dataclasses import replace

    for entry in REGISTRY.values():
        if entry.stand_in_env and os.environ.get(entry.stand_in_env) == "1":
            logging.getLogger(__name__).warning(
                "%s=1: the %s backend runs instead of %s; what it writes are not embeddings (a pipeline benchmark)",
                entry.stand_in_env, entry.name, spec.kind,
            )  # fmt: skip
            return replace(spec, kind=entry.name)
    return spec


def register(entry: BackendEntry) -> BackendEntry:
    """Add a backend (or replace the one of the same name); it is then a ``--backend`` choice if ``listed``."""
    unknown = [f for f in entry.formats if f not in FORMATS]
    if unknown or not entry.formats:
        raise ConfigError(f"backend {entry.name!r}: formats {list(entry.formats)}; expected some of {list(FORMATS)}")
    REGISTRY[entry.name] = entry
    return entry
