"""One DINO training step written out from the method's definition, for oracle tests of ``scdino.training``.

It shares no code with scdino: a functional float64 ViT over a state dict (explicit attention, DINO's bicubic
position-embedding interpolation by scale factor for smaller crops), the DINO head (3-layer GELU MLP, L2 normalisation,
weight-normalised last layer g * v / ||v||), and the loss (cross-entropy between the centred, sharpened teacher softmax
of each global view and the student softmax of every other view), differentiated by autograd.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _ln(v, w, b):
    mu = v.mean(-1, keepdim=True)
    var = ((v - mu) ** 2).mean(-1, keepdim=True)
    return (v - mu) / torch.sqrt(var + 1e-6) * w + b


def _pos(pos, grid):
    n = pos.shape[1] - 1
    if grid * grid == n:
        return pos
    old = int(math.sqrt(n))
    f = (grid + 0.1) / math.sqrt(n)  # DINO's vision_transformer.interpolate_pos_encoding
    g = F.interpolate(pos[:, 1:].reshape(1, old, old, -1).permute(0, 3, 1, 2), scale_factor=(f, f), mode="bicubic")
    return torch.cat([pos[:, :1], g.permute(0, 2, 3, 1).reshape(1, grid * grid, -1)], 1)


def vit(p: dict, x: torch.Tensor, heads: int) -> torch.Tensor:
    """CLS tokens (B, D) of DINO's ViT with parameters ``p`` (float64 tensors) on images ``x``."""
    w = p["patch_embed.proj.weight"]
    patch = w.shape[-1]
    tok = F.conv2d(x, w, p["patch_embed.proj.bias"], stride=patch).flatten(2).transpose(1, 2)
    h = torch.cat([p["cls_token"].expand(len(x), -1, -1), tok], 1) + _pos(p["pos_embed"], x.shape[-1] // patch)
    d = h.shape[-1]
    depth = 1 + max(int(k.split(".")[1]) for k in p if k.startswith("blocks."))
    for i in range(depth):
        b = f"blocks.{i}."
        y = _ln(h, p[b + "norm1.weight"], p[b + "norm1.bias"])
        q, k, v = (y @ p[b + "attn.qkv.weight"].T + p[b + "attn.qkv.bias"]).split(d, -1)
        q, k, v = (z.reshape(len(x), -1, heads, d // heads).transpose(1, 2) for z in (q, k, v))
        a = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // heads), -1)
        h = h + (a @ v).transpose(1, 2).reshape(len(x), -1, d) @ p[b + "attn.proj.weight"].T + p[b + "attn.proj.bias"]
        y = _ln(h, p[b + "norm2.weight"], p[b + "norm2.bias"]) @ p[b + "mlp.fc1.weight"].T + p[b + "mlp.fc1.bias"]
        y = 0.5 * y * (1 + torch.erf(y / math.sqrt(2)))
        h = h + y @ p[b + "mlp.fc2.weight"].T + p[b + "mlp.fc2.bias"]
    return _ln(h, p["norm.weight"], p["norm.bias"])[:, 0]


def head(p: dict, e: torch.Tensor) -> torch.Tensor:
    gelu = lambda z: 0.5 * z * (1 + torch.erf(z / math.sqrt(2)))
    y = gelu(e @ p["mlp.0.weight"].T + p["mlp.0.bias"])
    y = gelu(y @ p["mlp.2.weight"].T + p["mlp.2.bias"])
    y = y @ p["mlp.4.weight"].T + p["mlp.4.bias"]
    y = y / y.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    v = p["last_layer.weight_v"]
    return y @ (p["last_layer.weight_g"] * v / v.norm(dim=1, keepdim=True)).T


def step(
    student: dict,
    teacher: dict,
    center: torch.Tensor,
    views: list[torch.Tensor],
    heads: int,
    *,
    teacher_temp,
    student_temp,
    center_momentum,
):
    """(loss, gradients of the student's parameters, teacher outputs, the new centre, details) of one DINO step, in
    float64; details: the student's outputs per view and the teacher's CLS embeddings (for monitoring checks)."""
    sp = {k: v.detach().double().requires_grad_(v.is_floating_point()) for k, v in student.items()}
    tp = {k: v.detach().double() for k, v in teacher.items()}

    def net(p, x):
        bb = {k[len("backbone.") :]: v for k, v in p.items() if k.startswith("backbone.")}
        hd = {k[len("head.") :]: v for k, v in p.items() if k.startswith("head.")}
        return head(hd, vit(bb, x.double(), heads))

    t_out = [net(tp, v) for v in views[:2]]
    s_out = [net(sp, v) for v in views]
    bb = {k[len("backbone.") :]: v for k, v in tp.items() if k.startswith("backbone.")}
    t_cls = torch.cat([vit(bb, v.double(), heads) for v in views[:2]])
    c = center.double()
    total, terms = 0.0, 0
    for iq, t in enumerate(t_out):
        q = torch.softmax((t - c) / teacher_temp, -1)
        for iv, s in enumerate(s_out):
            if iv == iq:
                continue
            total = total + (-(q * torch.log_softmax(s / student_temp, -1)).sum(-1)).mean()
            terms += 1
    loss = total / terms
    loss.backward()
    grads = {k: v.grad for k, v in sp.items() if v.grad is not None}
    t_all = torch.cat(t_out)
    new_center = c * center_momentum + t_all.mean(0, keepdim=True) * (1 - center_momentum)
    details = {"student": [o.detach() for o in s_out], "teacher_cls": t_cls}
    return loss.detach(), grads, t_all.detach(), new_center, details


# --- the schedule and the optimiser, from DINO's definitions (main_dino.py's train loop, utils.cosine_scheduler) ---


def cosine_at(i: int, base: float, final: float, epochs: int, per_epoch: int, warmup_epochs: int = 0) -> float:
    """Iteration ``i`` of a schedule that rises linearly from 0 to ``base`` over ``warmup_epochs`` (the warm-up's last
    iteration reaching ``base``), then follows half a cosine from ``base`` towards ``final`` over the remaining
    iterations (reaching it one step after the last)."""
    warm = warmup_epochs * per_epoch
    if i < warm:
        return base * i / (warm - 1) if warm > 1 else base
    rest = epochs * per_epoch - warm
    return final + (base - final) * (1 + math.cos(math.pi * (i - warm) / rest)) / 2


def teacher_temp_at(epoch: int, warm: float, final: float, warm_epochs: int) -> float:
    """Epoch ``epoch`` (0-based) of the teacher temperature: ``warm`` in the first epoch, rising in equal steps to
    ``final`` in epoch ``warm_epochs - 1``, then ``final``."""
    if epoch >= warm_epochs:
        return final
    if warm_epochs == 1:  # one warm-up epoch: the warm value, then the final one
        return warm
    return warm + (final - warm) * epoch / (warm_epochs - 1)


def decays(name: str, shape) -> bool:
    """DINO regularises every weight matrix and embedding; no bias and nothing one-dimensional (norm weights)."""
    return not (name.endswith(".bias") or len(shape) == 1)


def clip(grad: torch.Tensor, limit: float) -> tuple[torch.Tensor, bool]:
    """One parameter's gradient scaled to norm ``limit`` (up to the 1e-6 of DINO's clip coefficient) when longer."""
    coef = limit / (float(grad.norm()) + 1e-6)
    return (grad * coef, True) if coef < 1 else (grad, False)


def adam_moments(m, v, grad, betas=(0.9, 0.999)):
    """Adam's running first and second moments after one gradient."""
    b1, b2 = betas
    return b1 * m + (1 - b1) * grad, b2 * v + (1 - b2) * grad * grad


def adamw_parameter(p, m_new, v_new, step: int, lr: float, wd: float, betas=(0.9, 0.999), eps=1e-8):
    """The parameter after AdamW's step number ``step`` (Loshchilov & Hutter's decoupled weight decay), from that
    step's moments: shrink by lr * wd, then move by the bias-corrected m / (sqrt(v) + eps)."""
    b1, b2 = betas
    m_hat = m_new / (1 - b1**step)
    v_hat = v_new / (1 - b2**step)
    return p * (1 - lr * wd) - lr * m_hat / (v_hat.sqrt() + eps)
