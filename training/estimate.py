"""What a training run's settings will cost, said before the first epoch: memory and time per step and per epoch.

Memory is counted from the settings: weights, gradients and AdamW's two moments of the student plus the teacher's
weights; the backbone's activations that the backward pass keeps (about 20 floats per embedding dimension, token and
block in fp32: layer-norm inputs and outputs, q, k, v, the attention output, the MLP's 4x-wide hidden layer before
and after GELU; with activation checkpointing, the measured share of them that stays resident); the head's outputs
and the loss's log-softmaxes (one per student view and teacher view pair); the crops. Time is the step's
floating-point operations (forward of the teacher on the global views; forward and backward, twice the forward, of
the student on every view) over a matrix-multiply rate measured here for a fraction of a second.
``benchmarks/train_memory.py`` sets the estimates beside measured steps.
"""

from __future__ import annotations

import logging
import time

import torch

from scdino.models import arch_config

log = logging.getLogger(__name__)

#: fp32 floats the backward pass keeps per embedding dimension, token and block (see the module docstring)
FLOATS_PER_TOKEN_DIM = 20
#: with activation checkpointing, the share of those activations still resident at the peak: measured, not derived
#: (``benchmarks/train_memory.py``: 16.6 GB -> 6.2 GB peak for the defaults on a ViT-tiny/8; the block inputs alone
#: would be a twentieth, but the recomputed blocks' buffers and their gradients stay in the allocator's arenas)
CHECKPOINT_SHARE = 0.32
#: the interpreter, PyTorch and the libraries before any tensor (measured on this project's CPU machines)
RUNTIME_GB = 0.5
#: share of the measured matrix-multiply rate that a ViT training step reaches (its matrices are smaller, and it
#: has layer norms, softmaxes and GELUs besides)
EFFICIENCY = 0.5


def _arch(cfg, in_chans: int):
    return arch_config(cfg.arch_name, in_chans=in_chans, img_size=cfg.global_size)


def _params(cfg, a) -> tuple[int, int]:
    """(backbone, head) parameter counts, from the architecture."""
    d, p, g = a.embed_dim, a.patch_size, cfg.global_size // a.patch_size
    hid = int(d * a.mlp_ratio)
    block = 4 * d + 3 * d * d + 3 * d + d * d + d + d * hid + hid + hid * d + d
    backbone = a.in_chans * p * p * d + d + d + (g * g + 1) * d + a.depth * block + 2 * d
    h, b, k = cfg.head_hidden, cfg.head_bottleneck, cfg.out_dim
    head = d * h + h + h * h + h + h * b + b + b * k + k
    return backbone, head


def _forward_flops(cfg, a, size: int) -> float:
    """Multiply-adds x 2 of one image of side ``size`` through backbone and head."""
    d, n = a.embed_dim, (size // a.patch_size) ** 2 + 1
    hid = int(d * a.mlp_ratio)
    per_block = n * (4 * d * d + 2 * d * hid) + 2 * n * n * d  # qkv + proj, MLP; scores and weighted sum
    patch = (n - 1) * a.in_chans * a.patch_size**2 * d
    head = d * cfg.head_hidden + cfg.head_hidden**2 + cfg.head_hidden * cfg.head_bottleneck
    head += cfg.head_bottleneck * cfg.out_dim
    return 2.0 * (a.depth * per_block + patch + head)


def matmul_rate(tries: int = 5, seconds: float = 0.05) -> float:
    """Floating-point operations per second of fp32 matrix multiplies of a ViT's shapes, on this process's threads:
    the best of a few short tries (a busy machine lowers some of them)."""
    x, w = torch.randn(2048, 384), torch.randn(384, 1536)
    x @ w  # warm-up
    best = 0.0
    for _ in range(tries):
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            x @ w
            n += 1
        best = max(best, 2.0 * 2048 * 384 * 1536 * n / (time.perf_counter() - t0))
    return best


def estimate(cfg, crops: torch.Tensor, n_iter: int, rate: float | None = None) -> dict:
    """Memory (GB) and time (s per step, min per epoch) of a run of ``cfg`` over ``crops``, ``n_iter`` steps an
    epoch; ``rate``: floating-point operations per second (measured here when None)."""
    a = _arch(cfg, crops.shape[1])
    b = cfg.batch_size_per_device
    views = 2 + cfg.local_crops
    backbone, head = _params(cfg, a)
    weights = 4 * (5 * (backbone + head))  # student, its gradient, AdamW's two moments; the teacher
    tokens_g = (cfg.global_size // a.patch_size) ** 2 + 1
    tokens_l = (cfg.local_size // a.patch_size) ** 2 + 1
    tokens = b * (2 * tokens_g + cfg.local_crops * tokens_l)
    acts = 4 * tokens * FLOATS_PER_TOKEN_DIM * a.embed_dim * a.depth
    if cfg.activation_checkpointing:
        acts *= CHECKPOINT_SHARE
    head_out = 4 * b * cfg.out_dim * (2 * views + 2 * (views - 1) + 4)
    data = crops.element_size() * crops.numel()
    peak = RUNTIME_GB * 1e9 + weights + acts + head_out + data
    fwd = 2 * _forward_flops(cfg, a, cfg.global_size) + cfg.local_crops * _forward_flops(cfg, a, cfg.local_size)
    student = (4 if cfg.activation_checkpointing else 3) * fwd
    teacher = 2 * _forward_flops(cfg, a, cfg.global_size)
    flops = b * (student + teacher)
    rate = rate or matmul_rate()
    step = flops / (EFFICIENCY * rate)
    return {
        "weights_and_optimiser_gb": weights / 1e9,
        "activations_gb": acts / 1e9,
        "head_and_loss_gb": head_out / 1e9,
        "crops_gb": data / 1e9,
        "peak_gb": peak / 1e9,
        "tflop_per_step": flops / 1e12,
        "gflops_measured": rate / 1e9,
        "seconds_per_step": step,
        "minutes_per_epoch": step * n_iter / 60,
    }


def tell(cfg, crops: torch.Tensor, n_iter: int, device: torch.device) -> dict:
    """Log the estimate before the first epoch; on a CPU, warn where it exceeds the free memory or an epoch would take
    more than 10 minutes, with what lowers it."""
    import psutil

    e = estimate(cfg, crops, n_iter, rate=matmul_rate() if device.type == "cpu" else None)
    where = "this CPU" if device.type == "cpu" else "this machine's CPU (the GPU is faster)"
    log.info(
        "these settings need about %.1f GB of memory (weights and optimiser %.2f, activations %.2f, head and loss "
        "%.2f, crops %.2f) and about %.1f s a step, %.0f min an epoch of %d steps on %s (%.1f TFLOP a step at "
        "%.0f GFLOP/s measured)",
        e["peak_gb"], e["weights_and_optimiser_gb"], e["activations_gb"], e["head_and_loss_gb"], e["crops_gb"],
        e["seconds_per_step"], e["minutes_per_epoch"], n_iter, where, e["tflop_per_step"], e["gflops_measured"],
    )  # fmt: skip
    if device.type != "cpu":
        return e
    free = psutil.virtual_memory().available / 1e9
    if e["peak_gb"] > free:
        fix = "" if cfg.activation_checkpointing else "--set activation_checkpointing=true, "
        log.warning(
            "about %.1f GB needed, %.1f GB free: lower it with %ssmaller views (--set global_size=..., local_size=...) "
            "or --batch-size-per-device, or the CPU-sized preset of docs/training.md",
            e["peak_gb"],
            free,
            fix,
        )
    if e["minutes_per_epoch"] > 10:
        log.warning(
            "about %.0f min an epoch on this CPU: views at the crops' own size (--set global_size=...), fewer local "
            "crops or a smaller head cut it (the CPU-sized preset of docs/training.md), or train on a GPU",
            e["minutes_per_epoch"],
        )
    return e
