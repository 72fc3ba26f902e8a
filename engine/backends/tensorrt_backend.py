"""TensorRT backend for ``.plan`` files built by ``scdino-export tensorrt``.

Two slots, each with its own CUDA stream, execution context, pinned host buffers and device buffers: while one
slot's batch is computed, the next slot's raw crops are copied in and the previous slot's embeddings copied out.
Device memory is managed with PyTorch's CUDA tensors (no pycuda needed).

The plan says what it takes: its tensor names, dtypes and shapes and the batch range of its optimisation profile are
read from the engine (:func:`scdino.export.tensorrt_plan.plan_io`), and a plan whose names, channels, crop size or
output width differ from its sidecar is refused. Batches are of the plan's opt size (``scdino-export tensorrt
--opt-batch``, by default the batch the engine sends this model on a GPU), never above its max.

One backend serves one thread at a time: a Dask worker with several threads (``dask worker`` runs one per core, a
reused ``Client`` may send blocks at once) would otherwise share the slots' buffers and bookkeeping and collect each
other's rows. :meth:`TensorRTBackend.infer` holds a lock; the device output is filled with NaN before each batch and
every row must come back finite, so a row TensorRT did not write is an error, never silent garbage.
"""

from __future__ import annotations

import logging
import threading

import numpy as np

from scdino._optional import require
from scdino.engine.backends.base import BackendSpec, check_crops
from scdino.errors import ConfigError, ScdinoError
from scdino.export.tensorrt_plan import PlanIO, check_plan_io, plan_io
from scdino.models.plan import check_plan, gpu_identity

log = logging.getLogger(__name__)


class CudaMemory:
    """The device operations the backend needs, on PyTorch's CUDA runtime (a test replaces them with host ones)."""

    def __init__(self) -> None:
        import torch

        self.torch = torch

    def stream(self):
        return self.torch.cuda.Stream()

    def event(self):
        return self.torch.cuda.Event()

    def use(self, stream):
        return self.torch.cuda.stream(stream)

    def pinned(self, shape, dtype):
        return self.torch.empty(shape, dtype=dtype, pin_memory=True)

    def device(self, shape, dtype):
        return self.torch.empty(shape, dtype=dtype, device="cuda")

    def handle(self, stream) -> int:
        return stream.cuda_stream


#: the plan tensor types the buffers take (numpy names, :func:`scdino.export.tensorrt_plan.numpy_dtype`, which are
#: PyTorch's names too)
BUFFERS = ("int32", "uint8", "int8", "float32", "float16")


class TensorRTBackend:
    name = "tensorrt"

    def __init__(self, spec: BackendSpec, memory: CudaMemory | None = None) -> None:
        import torch

        trt = require("tensorrt")
        self.spec = spec
        self.card = card = spec.card  # channels were checked when the card was made
        if memory is None:
            check_plan(dict(card.details), trt.__version__, gpu_identity(), str(spec.model))
        self.mem = memory or CudaMemory()
        self.lock = threading.Lock()
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)  # must outlive the engine
        with open(spec.model, "rb") as f:
            self.engine = self.runtime.deserialize_cuda_engine(f.read())
        if self.engine is None:
            raise ConfigError(f"{spec.model}: TensorRT cannot load this plan; rebuild it on this machine")
        self.io = io = self._check_plan(trt)
        self.max_batch = io.batches[2]
        self.batch = min(io.batches[1], self.max_batch)
        if spec.batch_size != self.batch:
            log.info(
                "%s: batches of %d, the plan's optimisation profile (the run asked for %d; rebuild the plan with "
                "--opt-batch to change it)",
                spec.model,
                self.batch,
                spec.batch_size,
            )
        self.embed_dim = card.embed_dim
        self.np_dtype = np.dtype(io.input_dtype)
        tin, tout = getattr(torch, io.input_dtype), getattr(torch, io.output_dtype)
        shape_in, shape_out = (self.batch, io.channels, io.crop_size, io.crop_size), (self.batch, self.embed_dim)
        m = self.mem
        self.slots = [
            {
                "stream": m.stream(),
                "ctx": self.engine.create_execution_context(),
                "h_in": m.pinned(shape_in, tin),
                "d_in": m.device(shape_in, tin),
                "d_out": m.device(shape_out, tout),
                "h_out": m.pinned(shape_out, tout),
                "done": m.event(),
                "pending": None,
            }
            for _ in range(2)
        ]
        self.info = {
            "backend": "tensorrt",
            "device": "cuda",
            "tensorrt": trt.__version__,
            "precision": card.precision,
            "gpu": card.plan.gpu,
            "batch": self.batch,
            "profile": {"min": io.batches[0], "opt": io.batches[1], "max": io.batches[2]},
        }

    def _check_plan(self, trt) -> PlanIO:
        """The plan's tensors as the plan declares them, refused where they differ from its sidecar (the card) or
        have types the buffers do not take."""
        card, model = self.card, str(self.spec.model)
        io = plan_io(trt, self.engine, model)
        expected = {
            "input": card.plan.input_name,
            "output": card.plan.output_name,
            "channels": card.in_chans,
            "crop_size": card.crop_size,
            "width": card.embed_dim,
        }
        check_plan_io(io, expected, model, card.details.get("source_onnx"))
        odd = [f"{n} is {d}" for n, d in ((io.input, io.input_dtype), (io.output, io.output_dtype)) if d not in BUFFERS]
        if odd:
            raise ConfigError(
                f"{model}: the plan's {' and '.join(odd)}; expected one of {', '.join(BUFFERS)}: build it with "
                "scdino-export tensorrt"
            )
        return io

    def _launch(self, slot: dict, crops: np.ndarray, start: int) -> None:
        n = len(crops)
        # one host copy: the plate's crops straight into the pinned buffer, widened to the plan's input type
        np.copyto(slot["h_in"][:n].numpy(), crops, casting="safe")
        io = self.io
        with self.mem.use(slot["stream"]):
            slot["d_in"][:n].copy_(slot["h_in"][:n], non_blocking=True)
            slot["d_out"][:n].fill_(float("nan"))  # a row TensorRT does not write stays NaN, and is caught
            ctx = slot["ctx"]
            if ctx.set_input_shape(io.input, tuple(slot["d_in"][:n].shape)) is False:
                raise ScdinoError(
                    f"{self.spec.model}: TensorRT refused a batch of {n} (the plan allows "
                    f"{io.batches[0]}..{io.batches[2]})"
                )
            ctx.set_tensor_address(io.input, slot["d_in"].data_ptr())
            ctx.set_tensor_address(io.output, slot["d_out"].data_ptr())
            if not ctx.execute_async_v3(self.mem.handle(slot["stream"])):
                raise ScdinoError(f"{self.spec.model}: TensorRT execution failed")
            slot["h_out"][:n].copy_(slot["d_out"][:n], non_blocking=True)
            slot["done"].record(slot["stream"])
        slot["pending"] = (start, n)

    def _collect(self, slot: dict, out: np.ndarray) -> None:
        if slot["pending"] is None:
            return
        slot["done"].synchronize()
        start, n = slot["pending"]
        out[start : start + n] = slot["h_out"][:n].float().numpy()  # the plan's output type, as float32
        slot["pending"] = None

    def _check_input(self, crops: np.ndarray) -> None:
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
        if not np.can_cast(crops.dtype, self.np_dtype, "safe"):
            raise ConfigError(
                f"{self.spec.model}: the plan's input {self.io.input!r} is {self.np_dtype}, which cannot hold "
                f"{crops.dtype} crops; rebuild the plan with scdino-export tensorrt from an export with --dtype "
                f"{crops.dtype}"
            )

    def infer(self, crops: np.ndarray) -> np.ndarray:
        self._check_input(crops)
        out = np.full((len(crops), self.embed_dim), np.nan, np.float32)
        with self.lock:  # the slots' buffers and bookkeeping belong to one caller at a time
            try:
                for k, i in enumerate(range(0, len(crops), self.batch)):
                    slot = self.slots[k % 2]
                    self._collect(slot, out)  # its previous batch must be out before its buffers are reused
                    self._launch(slot, crops[i : i + self.batch], i)
                for slot in self.slots:
                    self._collect(slot, out)
            finally:
                self._drain()
        missing = ~np.isfinite(out).all(axis=1)
        if missing.any():
            raise ScdinoError(
                f"{self.spec.model}: TensorRT left {int(missing.sum())} of {len(out)} embeddings unwritten or "
                "non-finite; the plan or the GPU misbehaved: rebuild the plan, or run with --backend onnxruntime"
            )
        return out

    def _drain(self) -> None:
        """Wait for whatever a failed batch left in flight, so that its buffers are free (and its errors surface)."""
        for slot in self.slots:
            if slot["pending"] is not None:
                slot["done"].synchronize()
                slot["pending"] = None

    def close(self) -> None:
        with self.lock:
            self._drain()
            self.slots.clear()
            del self.engine
            del self.runtime
