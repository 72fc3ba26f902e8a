"""The training loop: one process, or one of many under torchrun (DDP)."""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from scdino.errors import ConfigError, ScdinoError
from scdino.models import arch_config, embed_crops
from scdino.models.vit import VisionTransformer
from scdino.preprocess import Preprocessing
from scdino.training.augment import MultiCrop, channel_stats, intensity_range, make_generator
from scdino.training.config import TrainConfig
from scdino.training.data import epoch_order, load_crops
from scdino.training.dino import (
    DINOHead,
    DINOLoss,
    MultiCropWrapper,
    cancel_last_layer_gradients,
    clip_gradients,
    cosine_scheduler,
    param_groups,
)

log = logging.getLogger(__name__)


class TrainingDiverged(ScdinoError):
    """The loss became NaN or infinite."""


def setup_distributed() -> tuple[int, int, int]:
    """(rank, world size, local rank); initialises the process group under torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0"))
    return 0, 1, 0


def _device(cfg: TrainConfig, local_rank: int) -> torch.device:
    if cfg.device == "cpu" or (cfg.device == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


def _precision(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    if device.type != "cuda" or cfg.precision == "fp32":
        return None  # bf16 on a CPU without native support is 8-9x slower: never by default
    if cfg.precision == "bf16" or (cfg.precision == "auto" and torch.cuda.is_bf16_supported()):
        return torch.bfloat16
    return torch.float16


def build_networks(cfg: TrainConfig, in_chans: int) -> tuple[MultiCropWrapper, MultiCropWrapper]:
    arch = arch_config(cfg.arch_name, in_chans=in_chans, img_size=cfg.global_size, drop_path_rate=cfg.drop_path)
    student_bb = VisionTransformer(arch)
    if cfg.init != "scratch":
        from scdino.models import load_model

        lm = load_model(cfg.init, in_chans, cfg.global_size)
        student_bb.load_state_dict(lm.model.state_dict())
        log.info("initialised the backbone from %s", cfg.init)
    teacher_bb = VisionTransformer(arch_config(cfg.arch_name, in_chans=in_chans, img_size=cfg.global_size))
    d = arch.embed_dim
    student = MultiCropWrapper(
        student_bb, DINOHead(d, cfg.out_dim, cfg.head_hidden, cfg.head_bottleneck, cfg.norm_last_layer)
    )
    teacher = MultiCropWrapper(teacher_bb, DINOHead(d, cfg.out_dim, cfg.head_hidden, cfg.head_bottleneck))
    teacher.load_state_dict(student.state_dict())
    for p in teacher.parameters():
        p.requires_grad = False
    return student, teacher


def _atomic_save(obj: dict, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _args_namespace(cfg: TrainConfig) -> argparse.Namespace:
    d = {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.to_dict().items()}
    d["patch_size"] = cfg.patch
    return argparse.Namespace(**d)


def _check_resumed_scaling(path: Path, meta: dict, lo, hi) -> None:
    """A run resumes only with the intensity scaling its checkpoint was trained with (the engine and exporter trust
    the stored range)."""
    had = meta.get("scale_lo")
    if (had is None) != (lo is None) or (
        had is not None
        and not (np.allclose(had, lo.tolist(), rtol=1e-6) and np.allclose(meta["scale_hi"], hi.tolist(), rtol=1e-6))
    ):
        was = "per-crop min-max" if had is None else f"range {had}..{meta['scale_hi']}"
        now = "per-crop min-max" if lo is None else f"range {lo.tolist()}..{hi.tolist()}"
        raise ConfigError(
            f"{path}: trained with intensity scaling {was}, this run asks for {now}; resume with the original "
            "intensity_scaling / intensity_percentiles / data, or start a new --out"
        )


def train(cfg: TrainConfig) -> dict:
    """Train (or resume) into ``cfg.out``; returns a summary of the last epoch."""
    cfg.validate()
    rank, world, local_rank = setup_distributed()
    device = _device(cfg, local_rank)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.out)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
    from scdino.engine.segment import SegmentParams

    seg = SegmentParams(cfg.sigma, cfg.threshold, cfg.min_distance, cfg.min_area, cfg.max_area)
    crops, names, _ = load_crops(cfg.data, cfg.channels, cfg.labels, cfg.segment_channel, cfg.crop_size, seg, cfg.wells)
    lo = hi = None
    if cfg.intensity_scaling == "dataset":
        lo, hi = intensity_range(crops, cfg.intensity_percentiles, seed=cfg.seed)
        log.info("fixed intensity range per channel: %s", ", ".join(f"{a:g}..{b:g}" for a, b in zip(lo, hi)))
        empty = [n for n, a, b in zip(names, lo.tolist(), hi.tolist()) if b <= a]
        if empty:
            raise ConfigError(
                f"{cfg.data}: channel(s) {', '.join(empty)} have the same value at the {cfg.intensity_percentiles} "
                "percentiles of the training pixels (mostly empty), so a fixed range would zero them; widen "
                "--set intensity_percentiles=LOW,HIGH (e.g. 0,100) or use --set intensity_scaling=crop"
            )
    mean, std = channel_stats(crops, scale_lo=lo, scale_hi=hi)
    model_prep = Preprocessing(  # what the engine will apply to this model's inputs
        cfg.global_size,
        tuple(mean.tolist()),
        tuple(std.tolist()),
        scale_lo=tuple(lo.tolist()) if lo is not None else None,
        scale_hi=tuple(hi.tolist()) if hi is not None else None,
    )
    torch.manual_seed(cfg.seed)  # the same initial weights in every process and every run
    student, teacher = build_networks(cfg, crops.shape[1])
    student, teacher = student.to(device), teacher.to(device)
    model = (
        nn.parallel.DistributedDataParallel(student, device_ids=[local_rank] if device.type == "cuda" else None)
        if world > 1
        else student
    )
    n_crops = 2 + cfg.local_crops
    loss_fn = DINOLoss(
        cfg.out_dim,
        n_crops,
        cfg.warmup_teacher_temp,
        cfg.teacher_temp,
        cfg.warmup_teacher_temp_epochs,
        cfg.epochs,
        cfg.student_temp,
        cfg.center_momentum,
    ).to(device)
    optimizer = torch.optim.AdamW(param_groups(student))
    amp = _precision(cfg, device)
    scaler = torch.amp.GradScaler("cuda") if amp == torch.float16 else None
    bs = cfg.batch_size_per_device
    gb = bs * world
    n_iter = len(crops) // gb
    if n_iter == 0:
        raise ScdinoError(
            f"{cfg.data}: {len(crops)} crops, fewer than one global batch ({gb}); lower --batch-size-per-device"
        )
    if cfg.max_iters_per_epoch:
        n_iter = min(n_iter, cfg.max_iters_per_epoch)
    lr_s = cosine_scheduler(cfg.lr * gb / 256.0, cfg.min_lr, cfg.epochs, n_iter, cfg.warmup_epochs)
    wd_s = cosine_scheduler(cfg.weight_decay, cfg.weight_decay_end, cfg.epochs, n_iter)
    mom_s = cosine_scheduler(cfg.momentum_teacher, 1.0, cfg.epochs, n_iter)
    start = 0
    ckpt_path = out / "checkpoint.pth"
    if ckpt_path.is_file():
        from scdino.models.checkpoint import safe_load

        ck = safe_load(ckpt_path)
        student.load_state_dict({k.removeprefix("module."): v for k, v in ck["student"].items()})
        teacher.load_state_dict(ck["teacher"])
        optimizer.load_state_dict(ck["optimizer"])
        loss_fn.load_state_dict(ck["dino_loss"])
        if scaler is not None and ck.get("fp16_scaler"):
            scaler.load_state_dict(ck["fp16_scaler"])
        start = int(ck["epoch"])
        _check_resumed_scaling(ckpt_path, ck.get("scdino") or {}, lo, hi)
        if rank == 0:
            log.info("resuming %s after epoch %d", ckpt_path, start)
    val = None
    if cfg.knn_freq and rank == 0:
        from scdino.engine.knn import labels_of

        vcrops, _, vtable = load_crops(cfg.val_data, names)
        val = (vcrops, labels_of(vtable, cfg.val_label_key, cfg.val_data).to_numpy())
    def on_device(t):
        return t.to(device) if t is not None else None

    augment = MultiCrop(cfg, *map(on_device, (mean, std, lo, hi)))
    logf = open(out / "log.jsonl", "a") if rank == 0 else None
    from tqdm.auto import tqdm

    summary: dict = {}
    for epoch in range(start, cfg.epochs):
        order = epoch_order(len(crops), epoch, cfg.seed)
        student.train()
        t0 = time.perf_counter()
        losses = []
        bar = tqdm(range(n_iter), desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=rank != 0 or None, dynamic_ncols=True)
        for it in bar:
            gi = epoch * n_iter + it
            idx = order[it * gb : (it + 1) * gb][rank * bs : (rank + 1) * bs]
            raw = crops[idx].to(device, non_blocking=True)
            views = augment(raw, make_generator(cfg.seed, epoch, it, device), gb, rank * bs)
            torch.manual_seed(((cfg.seed * 1_000_003 + epoch) * 1_000_033 + it) * 131 + rank)  # drop path
            for i, group in enumerate(optimizer.param_groups):
                group["lr"] = float(lr_s[gi])
                if i == 0:
                    group["weight_decay"] = float(wd_s[gi])
            with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
                t_out = teacher(views[:2])
                s_out = model(views)
                loss = loss_fn(s_out.float(), t_out.float(), epoch)
            if not math.isfinite(loss.item()):
                msg = (
                    f"loss is {loss.item()} at epoch {epoch + 1}, iteration {it}: training diverged. The last good "
                    f"checkpoint ({ckpt_path}) is kept; lower --set lr=... or use --set precision=fp32"
                )
                if logf:
                    logf.write(json.dumps({"epoch": epoch, "iteration": it, "error": "non-finite loss"}) + "\n")
                    logf.close()
                raise TrainingDiverged(msg)
            optimizer.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.unscale_(optimizer)
            else:
                loss.backward()
            if cfg.clip_grad:
                clip_gradients(student, cfg.clip_grad)
            cancel_last_layer_gradients(epoch, student, cfg.freeze_last_layer)
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            with torch.no_grad():
                m = float(mom_s[gi])
                for ps, pt in zip(student.parameters(), teacher.parameters()):
                    pt.mul_(m).add_(ps.detach(), alpha=1 - m)
            losses.append(loss.item())
            if rank == 0:
                bar.set_postfix(loss=f"{losses[-1]:.4f}")
                if it % 10 == 0 or it == n_iter - 1:
                    logf.write(
                        json.dumps(
                            {
                                "epoch": epoch,
                                "iteration": it,
                                "loss": losses[-1],
                                "lr": float(lr_s[gi]),
                                "wd": float(wd_s[gi]),
                                "momentum": m,
                            }
                        )
                        + "\n"
                    )
        seconds = time.perf_counter() - t0
        mean_loss = torch.tensor(float(np.mean(losses)), device=device)
        if world > 1:
            dist.all_reduce(mean_loss)
            mean_loss /= world
        summary = {
            "epoch": epoch + 1,
            "loss": float(mean_loss),
            "seconds": seconds,
            "crops_per_s": n_iter * gb / seconds,
            "lr": float(lr_s[(epoch + 1) * n_iter - 1]),
            "wd": float(wd_s[(epoch + 1) * n_iter - 1]),
            "momentum": float(mom_s[(epoch + 1) * n_iter - 1]),
        }
        if val is not None and (epoch + 1) % cfg.knn_freq == 0:
            from scdino.engine.knn import evaluate_knn

            emb = embed_crops(teacher.backbone, val[0], model_prep, device)
            summary["knn_top1"] = evaluate_knn(emb, val[1], seed=cfg.seed)["top1"]
        if rank == 0:
            logf.write(json.dumps({"summary": True, **summary}) + "\n")
            logf.flush()
            save = {
                "student": {f"module.{k}": v for k, v in student.state_dict().items()},
                "teacher": teacher.state_dict(),
                "optimizer": optimizer.state_dict(),
                "epoch": epoch + 1,
                "args": _args_namespace(cfg),
                "dino_loss": loss_fn.state_dict(),
                "fp16_scaler": scaler.state_dict() if scaler is not None else None,
                "scdino": {
                    "channels": names,
                    "mean": mean.tolist(),
                    "std": std.tolist(),
                    **({"scale_lo": lo.tolist(), "scale_hi": hi.tolist()} if lo is not None else {}),
                    "arch": cfg.arch_name,
                    "input_size": cfg.global_size,
                    "crop_size": int(crops.shape[-1]),
                    "data": cfg.data,
                },
            }
            _atomic_save(save, ckpt_path)
            if cfg.saveckp_freq and ((epoch + 1) % cfg.saveckp_freq == 0 or epoch + 1 == cfg.epochs):
                shutil.copyfile(ckpt_path, out / f"checkpoint{epoch + 1:04d}.pth")
        if world > 1:
            dist.barrier()
    if logf:
        logf.close()
    return summary
