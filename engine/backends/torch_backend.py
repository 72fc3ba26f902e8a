"""PyTorch backend: CPU, or CUDA with fp16 autocast.

On CUDA a block's raw crops are staged through pinned host memory (a uint16 plate widened to int32 in that same copy,
as CUDA has few uint16 kernels), every batch of the block runs under one autocast context (its weight casts are cached
for the block instead of redone per batch), and the embeddings stay on the GPU until one copy back at the end.
"""

from __future__ import annotations

import numpy as np
import torch

from scdino.engine.backends.base import BackendSpec, check_crops
from scdino.models import forget_checkpoints
from scdino.preprocess import apply


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
        self.autocast = self.device.type == "cuda"
        self.info = {
            "backend": "torch",
            "device": str(self.device),
            "torch": torch.__version__,
            "precision": spec.precision,
            "threads": torch.get_num_threads(),
        }

    @torch.inference_mode()
    def infer(self, crops: np.ndarray) -> np.ndarray:
        check_crops(crops, self.spec.n_channels)
        if self.device.type == "cuda":
            return self._infer_cuda(crops)
        out = np.empty((len(crops), self.embed_dim), np.float32)
        bs = self.spec.batch_size
        for i in range(0, len(crops), bs):
            x = torch.from_numpy(np.ascontiguousarray(crops[i : i + bs])).to(self.device, non_blocking=True)
            x = apply(x, self.prep)
            with torch.autocast(self.device.type, dtype=torch.float16, enabled=self.autocast):
                y = self.model(x)
            out[i : i + len(y)] = y.float().cpu().numpy()
        return out

    def _infer_cuda(self, crops: np.ndarray) -> np.ndarray:
        host_dtype = np.int32 if crops.dtype == np.uint16 else crops.dtype
        staged = torch.empty(crops.shape, dtype=torch.from_numpy(np.empty(0, host_dtype)).dtype, pin_memory=True)
        np.copyto(staged.numpy(), crops, casting="safe")
        x_all = staged.to(self.device, non_blocking=True)
        bs = self.spec.batch_size
        outs = []
        with torch.autocast("cuda", dtype=getattr(torch, self.spec.autocast)):
            for i in range(0, len(crops), bs):
                outs.append(self.model(apply(x_all[i : i + bs], self.prep)).float())
        if not outs:
            return np.zeros((0, self.embed_dim), np.float32)
        return torch.cat(outs).cpu().numpy()

    def close(self) -> None:
        del self.model
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
