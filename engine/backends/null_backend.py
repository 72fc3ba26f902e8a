"""A backend that computes nothing: zeros of the model's width, at once. For measuring the pipeline around the model
(``benchmarks/pipeline_ceiling.py``): selected only by ``SCDINO_NULL_BACKEND=1``, recorded as backend ``null`` in the
output (and in its resume fingerprint), never chosen by ``auto``. Its embeddings carry no information."""

from __future__ import annotations

import numpy as np

from scdino.engine.backends.base import BackendSpec, check_crops

#: the environment variable that swaps the run's backend for this one
ENV = "SCDINO_NULL_BACKEND"


class NullBackend:
    name = "null"

    def __init__(self, spec: BackendSpec) -> None:
        self.spec = spec
        self.embed_dim = spec.card.embed_dim
        self.info = {"null": True, "why": f"{ENV}=1: zeros instead of embeddings, to measure the pipeline"}

    def infer(self, crops: np.ndarray) -> np.ndarray:
        check_crops(crops, self.spec.n_channels)
        return np.zeros((len(crops), self.embed_dim), np.float32)

    def close(self) -> None:
        pass
