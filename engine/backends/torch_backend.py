"""PyTorch backend: CPU, or CUDA with fp16 autocast."""

from __future__ import annotations

import numpy as np
import torch

from scdino.engine.backends.base import BackendSpec, check_crops
from scdino.models import load_model
from scdino.preprocess import apply


class TorchBackend:
    name = "torch"

    def __init__(self, spec: BackendSpec) -> None:
        self.spec = spec
        if spec.threads:
            torch.set_num_threads(spec.threads)
        self.device = torch.device(spec.device)
        card = spec.card
        lm = load_model(card.spec, spec.n_channels, card.input_size, spec.checkpoint_key, spec.adapt, spec.seed)
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
        out = np.empty((len(crops), self.embed_dim), np.float32)
        bs = self.spec.batch_size
        for i in range(0, len(crops), bs):
            x = torch.from_numpy(np.ascontiguousarray(crops[i : i + bs])).to(self.device, non_blocking=True)
            x = apply(x, self.prep)
            with torch.autocast(self.device.type, dtype=torch.float16, enabled=self.autocast):
                y = self.model(x)
            out[i : i + len(y)] = y.float().cpu().numpy()
        return out

    def close(self) -> None:
        del self.model
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
