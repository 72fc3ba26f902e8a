"""PyTorch backend: CPU, or CUDA with fp16 (or bf16) autocast.

On CUDA the GPU is fed by :class:`CudaFeed`:

* the raw crops go to the GPU in the plate's own dtype (a uint16 plate as 16-bit words, widened on the GPU: half the
  bytes of the int32 a host-side widening would send), through a ring of pinned host buffers allocated once;
* host-to-device copies run on their own CUDA stream, so the copy of the next batch overlaps the model on this one;
* a block is launched without waiting for it (:meth:`CudaFeed.launch` returns a function that waits), so the engine
  launches the next block while the GPU still runs this one: at least two blocks, each several batches, in flight;
* every batch of a block runs under one autocast context (its weight casts are cached for the block), and the
  embeddings come back in one copy per block, into a pinned buffer reused between blocks.
"""

from __future__ import annotations

import threading
from contextlib import nullcontext
from typing import Callable

import numpy as np
import torch

from scdino.engine.backends.base import BackendSpec, check_crops
from scdino.models import forget_checkpoints
from scdino.preprocess import apply

#: pinned input buffers (batches) in the ring: the one being filled, the one being copied, the one the model reads
RING = 3

#: raw dtypes sent as a signed type of the same width and widened on the GPU (CUDA has few kernels for unsigned ints):
#: dtype -> (sent as, widened to, mask)
_UNSIGNED = {
    np.dtype(np.uint16): (torch.int16, torch.int32, 0xFFFF),
    np.dtype(np.uint32): (torch.int32, torch.int64, 0xFFFFFFFF),
}


class TorchBackend:
    name = "torch"

    def __init__(self, spec: BackendSpec) -> None:
        self.spec = spec
        if spec.threads:
            torch.set_num_threads(spec.threads)
        self.device = torch.device(spec.device)
        lm = spec.card.load()
        forget_checkpoints()  # the model has its own copy of the weights now
        self.model = lm.model.to(self.device)
        self.prep = lm.prep
        self.embed_dim = lm.model.embed_dim
        self.feed = CudaFeed(self.model, self.prep, spec, self.device) if self.device.type == "cuda" else None
        self.info = {
            "backend": "torch",
            "device": str(self.device),
            "torch": torch.__version__,
            "precision": spec.precision,
            "threads": torch.get_num_threads(),
        }

    def launch(self, crops: np.ndarray) -> Callable[[], np.ndarray] | None:
        """On CUDA: start embedding ``crops`` and return a function that waits for the embeddings (None on the CPU,
        where :meth:`infer` runs)."""
        if self.feed is None:
            return None
        check_crops(crops, self.spec.n_channels)
        return self.feed.launch(crops)

    @torch.inference_mode()
    def infer(self, crops: np.ndarray) -> np.ndarray:
        check_crops(crops, self.spec.n_channels)
        if self.feed is not None:
            return self.feed.launch(crops)()
        out = np.empty((len(crops), self.embed_dim), np.float32)
        bs = self.spec.batch_size
        for i in range(0, len(crops), bs):
            x = torch.from_numpy(np.ascontiguousarray(crops[i : i + bs]))
            out[i : i + bs] = self.model(apply(x, self.prep)).float().numpy()
        return out

    def close(self) -> None:
        del self.model
        self.feed = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


class _NoStream:
    """Stands in for a CUDA stream where there is none (the feed's steps run on the CPU in tests)."""

    def wait_event(self, event) -> None:
        pass


class _NoEvent:
    def record(self, stream=None) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True


class CudaFeed:
    """Raw crops to the GPU and embeddings back, overlapped (see the module's docstring). On a device other than CUDA
    the same steps run with stand-ins for streams and events and without pinned memory (how the tests check the
    ring, the widening and the order of the results on a CPU)."""

    def __init__(self, model: torch.nn.Module, prep, spec: BackendSpec, device: torch.device) -> None:
        self.model, self.prep, self.spec, self.device = model, prep, spec, device
        self.cuda = device.type == "cuda"
        self.autocast = getattr(torch, spec.autocast)
        self.embed_dim = model.embed_dim
        self.copy_stream = torch.cuda.Stream(device) if self.cuda else _NoStream()
        self.compute_stream = torch.cuda.Stream(device) if self.cuda else _NoStream()
        self.ring: list[dict] = []  # made for the first block's dtype and shape
        self.turn = 0
        self.outputs: list[tuple[torch.Tensor, object]] = []  # pinned output buffers, each with its last use
        self.lock = threading.Lock()  # blocks are launched one at a time; their waits give buffers back from any thread

    def _event(self):
        return torch.cuda.Event() if self.cuda else _NoEvent()

    def _use(self, stream):
        return torch.cuda.stream(stream) if self.cuda else nullcontext()

    def _slots(self, crops: np.ndarray) -> list[dict]:
        """The ring of input buffers for crops like ``crops`` (made anew when their dtype or shape changes)."""
        send, widen, mask = _UNSIGNED.get(crops.dtype, (None, None, None))
        host = send or torch.from_numpy(np.empty(0, crops.dtype)).dtype
        shape = (self.spec.batch_size, *crops.shape[1:])
        if self.ring and self.ring[0]["key"] == (crops.dtype, shape):
            return self.ring
        for slot in self.ring:  # the old ring's copies and reads are finished before it goes
            slot["used"].synchronize()
        self.ring = []
        for _ in range(RING):
            h = torch.empty(shape, dtype=host, pin_memory=self.cuda)
            self.ring.append(
                {
                    "key": (crops.dtype, shape),
                    "host": h,
                    "view": h.numpy().view(crops.dtype),  # the plate's dtype over the same bytes
                    "dev": torch.empty(shape, dtype=host, device=self.device),
                    "copied": self._event(),  # the host buffer may be written again
                    "used": self._event(),  # the device buffer may be written again
                    "widen": (widen, mask),
                }
            )
        return self.ring

    def _output(self, n: int) -> torch.Tensor:
        """A pinned buffer for ``n`` embeddings that no block in flight still writes."""
        with self.lock:
            for k, (buf, done) in enumerate(self.outputs):
                if buf.shape[0] >= n and done.query():
                    return self.outputs.pop(k)[0]
        return torch.empty((max(n, self.spec.batch_size), self.embed_dim), dtype=torch.float32, pin_memory=self.cuda)

    @torch.inference_mode()
    def launch(self, crops: np.ndarray) -> Callable[[], np.ndarray]:
        """Queue every batch of ``crops`` on the GPU; the returned function waits and gives the embeddings."""
        n, bs = len(crops), self.spec.batch_size
        if n == 0:
            return lambda: np.zeros((0, self.embed_dim), np.float32)
        ring = self._slots(crops)
        host_out = self._output(n)
        with self._use(self.compute_stream):  # allocated for the stream that writes and reads it
            dev_out = torch.empty((n, self.embed_dim), dtype=torch.float32, device=self.device)
        for a in range(0, n, bs):
            m = min(bs, n - a)
            slot = ring[self.turn % RING]
            self.turn += 1
            slot["copied"].synchronize()  # its last copy to the GPU is done: the host buffer is free
            np.copyto(slot["view"][:m], crops[a : a + m])
            with self._use(self.copy_stream):
                self.copy_stream.wait_event(slot["used"])  # the model has read what the device buffer held
                slot["dev"][:m].copy_(slot["host"][:m], non_blocking=True)
                slot["copied"].record(self.copy_stream)
            with self._use(self.compute_stream):
                self.compute_stream.wait_event(slot["copied"])
                x = slot["dev"][:m]
                widen, mask = slot["widen"]
                if widen is not None:
                    x = x.to(widen).bitwise_and_(mask)
                with torch.autocast(self.device.type, dtype=self.autocast, enabled=self.cuda):
                    dev_out[a : a + m] = self.model(apply(x, self.prep)).float()
                slot["used"].record(self.compute_stream)
        done = self._event()
        with self._use(self.compute_stream):
            host_out[:n].copy_(dev_out, non_blocking=True)
            done.record(self.compute_stream)
        keep = [dev_out]  # the device buffer lives until the copy from it is done

        def wait() -> np.ndarray:
            done.synchronize()
            out = host_out[:n].numpy().copy()
            with self.lock:
                self.outputs.append((host_out, done))
            keep.clear()
            return out

        return wait
