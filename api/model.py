"""``scdino.load``: a model for crops already in memory, embedded exactly as the engine embeds a plate's.

:class:`Model` opens the backend ``scdino-engine run`` would open for the model (:mod:`scdino.engine.backends`):
every backend takes raw crops in their own dtype and does the one preprocessing of :mod:`scdino.preprocess` (per-crop
min-max or the model's fixed range, resize, mean/std) on its device, so an array of crops gives the embeddings a run
gives the same cells.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from scdino.engine.backends import BackendSpec, open_backend, resolve
from scdino.engine.config import RunConfig, cpu_batch_size, gpu_batch_size
from scdino.errors import InputError
from scdino.models.card import ModelCard, describe_model


class Model:
    """A model ready to embed crops (``scdino.load``); close it (or use ``with``) to free its memory early."""

    def __init__(self, card: ModelCard, spec: BackendSpec) -> None:
        self.card = card
        self.spec = spec
        self._backend: Any = open_backend(spec)

    @property
    def n_channels(self) -> int:
        """The channels each crop must have, in the model's order (:attr:`channels` names them where known)."""
        return self.spec.n_channels

    @property
    def channels(self) -> tuple[str, ...] | None:
        return self.card.channels

    @property
    def embed_dim(self) -> int:
        return self.card.embed_dim

    @property
    def backend(self) -> str:
        """Where it runs, e.g. ``torch on cpu``."""
        return f"{self.spec.kind} on {self.spec.device}"

    def __repr__(self) -> str:
        names = f" ({', '.join(self.channels)})" if self.channels else ""
        return (
            f"Model({self.card.name}: {self.card.arch}, {self.n_channels} channels{names}, {self.card.input_size} px "
            f"input, {self.embed_dim}-d embeddings, {self.backend})"
        )

    def embed(self, crops: np.ndarray) -> np.ndarray:
        """Embeddings (N, embed_dim) float32 of raw crops (N, C, S, S): integer or float pixels, as read from the
        images (not scaled: the model's preprocessing scales them), C the model's channels in its order."""
        crops = self._checked(crops)
        if not len(crops):
            return np.zeros((0, self.embed_dim), np.float32)
        if self._backend is None:
            raise InputError(f"{self.card.name}: the model was closed; load it again with scdino.load(...)")
        return np.asarray(self._backend.infer(np.ascontiguousarray(crops)), dtype=np.float32)

    def _checked(self, crops: Any) -> np.ndarray:
        """``crops`` as an array the backends take, or a one-line error saying what is wrong and what to pass."""
        if hasattr(crops, "detach"):  # a torch tensor
            crops = crops.detach().cpu().numpy()
        crops = np.asarray(crops)
        n, name = self.n_channels, self.card.name
        want = f"(N, {n}, S, S)"
        if crops.ndim == 3 and crops.shape[0] == n:
            raise InputError(f"crops of shape {crops.shape}: one crop; expected {want}: pass crops[None]")
        if crops.ndim != 4:
            raise InputError(f"crops of shape {crops.shape}: expected a 4-d array {want} (N crops of C channels)")
        if crops.shape[1] != n:
            names = f" ({', '.join(self.channels)}, in that order)" if self.channels else ""
            hint = "; channels last? pass crops.transpose(0, 3, 1, 2)" if crops.shape[3] == n else ""
            got = crops.shape[1]
            raise InputError(f"crops of shape {crops.shape}: {name} takes {n} channels{names}, got {got}{hint}")
        if crops.shape[2] != crops.shape[3] or crops.shape[2] < 1:
            raise InputError(
                f"crops of shape {crops.shape}: expected square crops {want}, as the engine cuts them; pad or cut them "
                "square around the cell"
            )
        if crops.dtype == bool or not (
            np.issubdtype(crops.dtype, np.integer) or np.issubdtype(crops.dtype, np.floating)
        ):
            raise InputError(
                f"crops of dtype {crops.dtype}: expected integer or float pixels (e.g. uint16 as the microscope wrote "
                "them)"
            )
        if np.issubdtype(crops.dtype, np.floating) and not np.isfinite(crops).all():
            raise InputError(f"crops hold NaN or infinite pixels ({name} needs finite values); replace them first")
        return crops

    def close(self) -> None:
        """Free the model now (it is freed with the object anyway)."""
        if self._backend is not None:
            self._backend.close()
            self._backend = None

    def __enter__(self) -> Model:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def load(
    model: str = "default",
    *,
    channels: Sequence[str] | str | None = None,
    n_channels: int | None = None,
    input_size: int | None = None,
    checkpoint_key: str | None = RunConfig.checkpoint_key,
    adapt: str = RunConfig.adapt,
    seed: int = RunConfig.seed,
    backend: str = RunConfig.backend,
    device: str = RunConfig.device,
    batch_size: int | None = None,
    threads: int | None = None,
) -> Model:
    """The model ``model`` (anything ``scdino-engine run --model`` takes), ready to embed crops in memory.

    A model trained on microscopy channels takes its own channels (``channels`` may name them, and must match); an
    RGB model (DINO's) or ``random:ARCH`` is adapted to ``channels`` (names) or ``n_channels`` (a count) with
    ``adapt``. ``input_size``, ``checkpoint_key``, ``backend``, ``device``, ``batch_size`` and ``threads`` are the
    run's options of the same names; the model runs in fp32 (fp16 autocast with PyTorch on CUDA, as a run does).
    """
    if isinstance(channels, str):
        channels = tuple(c.strip() for c in channels.split(",") if c.strip())
    card = describe_model(
        str(model),
        channels=tuple(channels) if channels is not None else None,
        n_channels=n_channels,
        input_size=input_size,
        checkpoint_key=checkpoint_key,
        adapt=adapt,
        seed=seed,
    )
    kind, dev = resolve(backend, device, card)
    n = len(channels) if channels is not None else n_channels or card.in_chans
    default = cpu_batch_size(card.tokens) if dev == "cpu" else gpu_batch_size(card.tokens)
    spec = BackendSpec(
        card=card,
        n_channels=int(n),
        kind=kind,
        device=dev,
        batch_size=batch_size or default,
        threads=threads,
        checkpoint_key=checkpoint_key,
        adapt=adapt,
        seed=seed,
    )
    return Model(card, spec)
