"""The torch side of an ONNX export: the graph's module (preprocessing inside, then the ViT) and its tracing. Imported
by :func:`scdino.export.onnx_export.export_onnx` when it exports, so that the engine's ONNX Runtime path, which only
reads exports, never imports torch."""

from __future__ import annotations

import copy
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from scdino.models.loader import LoadedModel
from scdino.preprocess_ops import fixed_scale, minmax_scale

TORCH_VERSION = torch.__version__


class _FP32LayerNorm(nn.LayerNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x.float(), self.normalized_shape, self.weight.float(), self.bias.float(), self.eps).to(
            x.dtype
        )


class ExportModule(nn.Module):
    """Raw float32 pixels (B, C, H, W) -> CLS (B, D) [, attention (B, heads, patches)]."""

    def __init__(self, lm: LoadedModel, attention: bool = False, precision: str = "fp32") -> None:
        super().__init__()
        vit = copy.deepcopy(lm.model).eval()
        self.half = precision == "fp16"
        if self.half:
            for name, mod in list(vit.named_modules()):
                if isinstance(mod, nn.LayerNorm):
                    ln = _FP32LayerNorm(mod.normalized_shape, eps=mod.eps)
                    ln.load_state_dict(mod.state_dict())
                    parent = vit.get_submodule(name.rsplit(".", 1)[0]) if "." in name else vit
                    setattr(parent, name.rsplit(".", 1)[-1], ln)
            vit = vit.half()
            for mod in vit.modules():
                if isinstance(mod, _FP32LayerNorm):
                    mod.float()
        self.vit = vit
        self.size = lm.prep.input_size
        self.attention = attention
        c = vit.cfg.in_chans
        mean = lm.prep.mean if lm.prep.mean is not None else (0.0,) * c
        std = lm.prep.std if lm.prep.std is not None else (1.0,) * c
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))
        self.normalise = lm.prep.mean is not None
        self.fixed = lm.prep.scale_lo is not None
        if self.fixed:
            self.register_buffer("scale_lo", torch.tensor(lm.prep.scale_lo, dtype=torch.float32))
            self.register_buffer("scale_hi", torch.tensor(lm.prep.scale_hi, dtype=torch.float32))

    def forward(self, x: torch.Tensor):
        y = fixed_scale(x, self.scale_lo, self.scale_hi) if self.fixed else minmax_scale(x)
        # always a Resize node, also when the crop already has the input size (then it is the identity)
        y = F.interpolate(y, size=(self.size, self.size), mode="bilinear", align_corners=False, antialias=False)
        if self.normalise:
            y = (y - self.mean) / self.std
        if self.half:
            y = y.half()
        if self.attention:
            cls, att = self.vit.forward_with_attention(y)
            return cls.float(), att.float()
        return self.vit(y).float()


def trace(wrapper: nn.Module, path, c: int, crop_size: int, names: list[str], opset: int) -> None:
    """Trace ``wrapper`` to ONNX at ``path`` with float32 input ``crops`` (dynamic batch, height and width)."""
    dummy = torch.rand(2, c, crop_size, crop_size) * 1000
    axes = {"crops": {0: "batch", 2: "height", 3: "width"}, **{n: {0: "batch"} for n in names}}
    with torch.inference_mode(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        torch.onnx.export(
            wrapper,
            (dummy,),
            str(path),
            input_names=["crops"],
            output_names=names,
            dynamic_axes=axes,
            opset_version=opset,
            dynamo=False,
            do_constant_folding=True,
        )
