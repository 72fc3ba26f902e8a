"""DINO head, multi-crop wrapper, loss with centring and sharpening, and the schedules (as in DINO)."""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


class WeightNormLinear(nn.Module):
    """Weight-normalised linear layer without bias, parameters named as ``nn.utils.weight_norm`` names them
    (``weight_g``, ``weight_v``) so that checkpoints keep DINO's keys."""

    def __init__(self, in_dim: int, out_dim: int, norm_fixed: bool = True) -> None:
        super().__init__()
        # DINO builds the layer as nn.utils.weight_norm(nn.Linear(...)) after its truncated-normal init of the MLP, so
        # the direction starts as nn.Linear's default (kaiming uniform, a=sqrt(5)): a larger norm than std 0.02, which
        # sets how fast the prototypes turn
        self.weight_v = nn.Parameter(torch.empty(out_dim, in_dim))
        nn.init.kaiming_uniform_(self.weight_v, a=5**0.5)
        self.weight_g = nn.Parameter(torch.ones(out_dim, 1), requires_grad=not norm_fixed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight_g * self.weight_v / self.weight_v.norm(dim=1, keepdim=True)
        return F.linear(x, w)


class DINOHead(nn.Module):
    """3-layer MLP (GELU) -> L2 normalisation -> weight-normalised last layer (SPEC section 5)."""

    def __init__(
        self, in_dim: int, out_dim: int = 65536, hidden: int = 2048, bottleneck: int = 256, norm_last_layer: bool = True
    ) -> None:
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(), nn.Linear(hidden, bottleneck)
        )
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        self.last_layer = WeightNormLinear(bottleneck, out_dim, norm_last_layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last_layer(F.normalize(self.mlp(x), dim=-1, p=2))


class MultiCropWrapper(nn.Module):
    """Backbone + head; crops of the same resolution go through the backbone together."""

    def __init__(self, backbone: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, crops: list[torch.Tensor], with_features: bool = False):
        """Head outputs of every crop (crops of one size batched together); with ``with_features`` also the backbone's
        CLS embeddings (for monitoring)."""
        sizes = [c.shape[-1] for c in crops]
        feats, start = [], 0
        while start < len(crops):
            end = start
            while end < len(crops) and sizes[end] == sizes[start]:
                end += 1
            x = torch.cat(crops[start:end])
            feats.append(self.backbone(x, interpolate=True))  # local crops: position embedding resized as DINO does
            start = end
        emb = torch.cat(feats)
        out = self.head(emb)
        return (out, emb) if with_features else out


class DINOLoss(nn.Module):
    """Cross-entropy between the teacher's centred, sharpened softmax on the global views and the student's softmax on
    every other view; the centre is an EMA of the teacher outputs, all-reduced across processes."""

    def __init__(
        self,
        out_dim: int,
        n_crops: int,
        warmup_teacher_temp: float,
        teacher_temp: float,
        warmup_teacher_temp_epochs: int,
        epochs: int,
        student_temp: float = 0.1,
        center_momentum: float = 0.9,
    ) -> None:
        super().__init__()
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.n_crops = n_crops
        self.register_buffer("center", torch.zeros(1, out_dim))
        self.last_stats: torch.Tensor | None = None  # see _stats
        self.teacher_temp_schedule = np.concatenate(
            (
                np.linspace(warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs),
                np.ones(max(0, epochs - warmup_teacher_temp_epochs)) * teacher_temp,
            )
        )

    def forward(self, student_out: torch.Tensor, teacher_out: torch.Tensor, epoch: int) -> torch.Tensor:
        s = (student_out / self.student_temp).chunk(self.n_crops)
        temp = self.teacher_temp(epoch)
        t = F.softmax((teacher_out - self.center) / temp, dim=-1).detach().chunk(2)
        total, n = 0.0, 0
        for iq, q in enumerate(t):
            for v in range(len(s)):
                if v == iq:
                    continue
                total = total + torch.sum(-q * F.log_softmax(s[v], dim=-1), dim=-1).mean()
                n += 1
        loss = total / n
        self.last_stats = self._stats(torch.cat(t), loss.detach())
        self.update_center(teacher_out)
        return loss

    def teacher_temp(self, epoch: int) -> float:
        """The teacher temperature of ``epoch`` (0-based; the last value beyond the schedule)."""
        return float(self.teacher_temp_schedule[min(epoch, len(self.teacher_temp_schedule) - 1)])

    @staticmethod
    @torch.no_grad()
    def _stats(q: torch.Tensor, loss: torch.Tensor) -> torch.Tensor:
        """(teacher entropy per cell, entropy of the batch-mean teacher output, student-teacher KL) in nats, of this
        step's targets ``q`` (the centred, sharpened teacher softmax). Every loss term is H(q) + KL(q || student) and
        each teacher view enters the same number of terms, so the mean KL is the loss minus the mean H(q)."""
        q = q.float()
        h_cell = -(q * q.clamp_min(1e-30).log()).sum(-1).mean()
        p = q.mean(0)
        h_mean = -(p * p.clamp_min(1e-30).log()).sum()
        return torch.stack([h_cell, h_mean, loss.float() - h_cell])

    @torch.no_grad()
    def update_center(self, teacher_out: torch.Tensor) -> None:
        batch_center = teacher_out.float().sum(dim=0, keepdim=True)
        count = torch.tensor([float(len(teacher_out))], device=teacher_out.device)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(batch_center)
            dist.all_reduce(count)
        batch_center = batch_center / count
        self.center.mul_(self.center_momentum).add_(batch_center * (1 - self.center_momentum))


def cosine_scheduler(
    base: float, final: float, epochs: int, niter_per_ep: int, warmup_epochs: int = 0, start_warmup_value: float = 0.0
) -> np.ndarray:
    """Per-iteration values: linear warmup, then cosine from ``base`` to ``final`` (DINO's utils.cosine_scheduler)."""
    warmup_iters = warmup_epochs * niter_per_ep
    warm = np.linspace(start_warmup_value, base, warmup_iters) if warmup_iters > 0 else np.array([])
    iters = np.arange(epochs * niter_per_ep - warmup_iters)
    sched = final + 0.5 * (base - final) * (1 + np.cos(np.pi * iters / max(1, len(iters))))
    out = np.concatenate((warm, sched))
    assert len(out) == epochs * niter_per_ep
    return out


def param_groups(model: nn.Module) -> list[dict]:
    """No weight decay on biases and normalisation weights (1-D parameters)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if name.endswith(".bias") or p.ndim == 1 else decay).append(p)
    return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]


def clip_gradients(model: nn.Module, clip: float) -> None:
    """Per-parameter gradient-norm clipping, as DINO does. On a GPU the norms and factors stay on the device (one
    fused pass, no host sync per parameter); on the CPU each parameter is done in turn, as before (bit for bit)."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if grads and grads[0].is_cuda:
        clip_fused(grads, clip)
        return
    for g in grads:
        factor = clip / (g.norm(2) + 1e-6)
        if factor < 1:
            g.mul_(factor)


def clip_fused(grads: list[torch.Tensor], clip: float) -> None:
    """The same clipping in one fused pass with the norms and factors on the device (no host sync per parameter)."""
    norms = torch._foreach_norm(grads, 2)
    factors = [torch.clamp(clip / (n + 1e-6), max=1.0) for n in norms]
    torch._foreach_mul_(grads, factors)


def cancel_last_layer_gradients(epoch: int, model: nn.Module, freeze_last_layer: int) -> None:
    if epoch >= freeze_last_layer:
        return
    for n, p in model.named_parameters():
        if "last_layer" in n:
            p.grad = None
