"""TensorRT backend for ``.plan`` files built by ``scdino-export tensorrt``.

Two slots, each with its own CUDA stream, execution context, pinned host buffers and device buffers: while one
slot's batch is computed, the next slot's raw crops are copied in and the previous slot's embeddings copied out.
Device memory is managed with PyTorch's CUDA tensors (no pycuda needed).
"""

from __future__ import annotations

import logging

import numpy as np

from scdino._optional import require
from scdino.engine.backends.base import BackendSpec, check_crops
from scdino.errors import ConfigError
from scdino.models.plan import check_plan, gpu_identity

log = logging.getLogger(__name__)


class TensorRTBackend:
    name = "tensorrt"

    def __init__(self, spec: BackendSpec) -> None:
        import torch

        trt = require("tensorrt")
        self.spec = spec
        self.card = card = spec.card  # channels were checked when the card was made
        check_plan(dict(card.details), trt.__version__, gpu_identity(), str(spec.model))
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)  # must outlive the engine
        with open(spec.model, "rb") as f:
            self.engine = self.runtime.deserialize_cuda_engine(f.read())
        if self.engine is None:
            raise ConfigError(f"{spec.model}: TensorRT cannot load this plan; rebuild it on this machine")
        self.max_batch = card.plan.max_batch
        self.batch = min(spec.batch_size, self.max_batch)
        c, s = card.in_chans, card.crop_size
        self.embed_dim = card.embed_dim
        tdtype = {"int32": torch.int32, "uint8": torch.uint8, "float32": torch.float32}[card.plan.input_dtype]
        self.np_dtype = np.dtype(card.plan.input_dtype)
        self.slots = []
        for _ in range(2):
            self.slots.append(
                {
                    "stream": torch.cuda.Stream(),
                    "ctx": self.engine.create_execution_context(),
                    "h_in": torch.empty((self.batch, c, s, s), dtype=tdtype, pin_memory=True),
                    "d_in": torch.empty((self.batch, c, s, s), dtype=tdtype, device="cuda"),
                    "d_out": torch.empty((self.batch, self.embed_dim), dtype=torch.float32, device="cuda"),
                    "h_out": torch.empty((self.batch, self.embed_dim), dtype=torch.float32, pin_memory=True),
                    "done": torch.cuda.Event(),
                    "pending": None,
                }
            )
        self.info = {
            "backend": "tensorrt",
            "device": "cuda",
            "tensorrt": trt.__version__,
            "precision": card.precision,
            "gpu": card.plan.gpu,
            "batch": self.batch,
        }

    def _launch(self, slot: dict, crops: np.ndarray, start: int) -> None:
        import torch

        n = len(crops)
        slot["h_in"][:n].numpy()[...] = crops
        with torch.cuda.stream(slot["stream"]):
            slot["d_in"][:n].copy_(slot["h_in"][:n], non_blocking=True)
            ctx = slot["ctx"]
            ctx.set_input_shape("crops", tuple(slot["d_in"][:n].shape))
            ctx.set_tensor_address("crops", slot["d_in"].data_ptr())
            ctx.set_tensor_address("cls", slot["d_out"].data_ptr())
            if not ctx.execute_async_v3(slot["stream"].cuda_stream):
                raise ConfigError(f"{self.spec.model}: TensorRT execution failed")
            slot["h_out"][:n].copy_(slot["d_out"][:n], non_blocking=True)
            slot["done"].record(slot["stream"])
        slot["pending"] = (start, n)

    def _collect(self, slot: dict, out: np.ndarray) -> None:
        if slot["pending"] is None:
            return
        slot["done"].synchronize()
        start, n = slot["pending"]
        out[start : start + n] = slot["h_out"][:n].numpy()
        slot["pending"] = None

    def infer(self, crops: np.ndarray) -> np.ndarray:
        check_crops(crops, self.spec.n_channels)
        if crops.shape[-1] != self.card.crop_size:
            raise ConfigError(
                f"{self.spec.model}: built for {self.card.crop_size} px crops, got "
                f"{crops.shape[-1]}; rebuild the plan or use --crop-size {self.card.crop_size}"
            )
        exported = np.dtype(self.card.dtype)
        if crops.dtype != exported and not np.can_cast(crops.dtype, exported, "safe"):
            raise ConfigError(
                f"{self.spec.model}: built for {exported} crops, the plate gives {crops.dtype}; export "
                f"again with --dtype {crops.dtype} and rebuild the plan"
            )
        x = crops.astype(self.np_dtype, copy=False)
        out = np.empty((len(x), self.embed_dim), np.float32)
        for k, i in enumerate(range(0, len(x), self.batch)):
            slot = self.slots[k % 2]
            self._collect(slot, out)  # its previous batch must be out before its buffers are reused
            self._launch(slot, x[i : i + self.batch], i)
        for slot in self.slots:
            self._collect(slot, out)
        return out

    def close(self) -> None:
        self.slots.clear()
        del self.engine
        del self.runtime
