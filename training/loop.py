"""The training loop: one process, or one of many under torchrun (DDP)."""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from scdino.cells.options import CellOptions
from scdino.cells.source import source_type, usable_options
from scdino.cpu import has_native_bf16
from scdino.errors import CheckpointError, ConfigError, ScdinoError
from scdino.knn import evaluate_knn, labels_of
from scdino.models import arch_config, embed_crops
from scdino.models.card import describe_model
from scdino.models.vit import VisionTransformer
from scdino.outputs import MARKER, claim_dir
from scdino.preprocess import Preprocessing
from scdino.training import record
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


def setup_distributed(cfg: TrainConfig) -> tuple[int, int, torch.device]:
    """(rank, world size, device); under torchrun, the device is chosen and set first, then the process group starts
    with the backend that device needs (NCCL for CUDA tensors, gloo for CPU ones: ``--device cpu`` on a GPU machine
    all-reduces CPU tensors)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = _device(cfg, local_rank)
    if world > 1 and not dist.is_initialized():
        if device.type == "cuda":
            dist.init_process_group("nccl", device_id=device)
        else:
            dist.init_process_group("gloo")
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), device
    return 0, 1, device


def _device(cfg: TrainConfig, local_rank: int) -> torch.device:
    if cfg.device == "cpu" or (cfg.device == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


def _precision(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of a run (None: fp32). On a GPU: bf16 where supported, else fp16 with loss scaling. On a CPU:
    bf16 where the CPU has it natively (avx512_bf16 or AMX: ~1.5x fp32 here, ``benchmarks/train_throughput.py``); on
    other CPUs bf16 is emulated and several times slower than fp32, so ``auto`` keeps fp32 there."""
    if cfg.precision == "fp32":
        return None
    if device.type == "cuda":
        if cfg.precision == "bf16" or (cfg.precision == "auto" and torch.cuda.is_bf16_supported()):
            return torch.bfloat16
        return torch.float16
    if cfg.precision == "fp16":
        raise ConfigError("precision fp16 is for GPUs; on a CPU use bf16 (CPUs with avx512_bf16 or AMX) or fp32")
    native = has_native_bf16()
    if cfg.precision == "bf16" and not native:
        log.warning("this CPU has no native bf16 (avx512_bf16/AMX): bf16 training will be slower than fp32")
    return torch.bfloat16 if cfg.precision == "bf16" or native else None


def build_networks(cfg: TrainConfig, in_chans: int) -> tuple[MultiCropWrapper, MultiCropWrapper]:
    arch = arch_config(cfg.arch_name, in_chans=in_chans, img_size=cfg.global_size, drop_path_rate=cfg.drop_path)
    student_bb = VisionTransformer(arch)
    if cfg.init != "scratch":
        student_bb.load_state_dict(describe_model(cfg.init, n_channels=in_chans, input_size=cfg.global_size).weights())
        log.info("initialised the backbone from %s", cfg.init)
    student_bb.checkpoint_blocks = cfg.activation_checkpointing
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


def _amp_name(amp: torch.dtype | None) -> str:
    return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(amp, "fp32")


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


@dataclass
class TrainingData:
    """The training crops and what the model will be told about them (stored in every checkpoint)."""

    crops: torch.Tensor
    names: list[str]
    mean: torch.Tensor
    std: torch.Tensor
    lo: torch.Tensor | None
    hi: torch.Tensor | None
    #: what the engine will apply to this model's inputs
    prep: Preprocessing


def prepare_data(cfg: TrainConfig) -> TrainingData:
    """Load the crops of ``cfg.data`` and describe them (:func:`data_from_crops`)."""
    crops, names, _ = load_crops(cfg.data, cfg.cells())
    return data_from_crops(cfg, crops, names)


def data_from_crops(cfg: TrainConfig, crops: torch.Tensor, names: list[str]) -> TrainingData:
    """Training data from crops in memory: the fixed intensity range (``intensity_scaling=dataset``) and the channel
    statistics the model will store."""
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
    prep = Preprocessing(
        cfg.global_size,
        tuple(mean.tolist()),
        tuple(std.tolist()),
        scale_lo=tuple(lo.tolist()) if lo is not None else None,
        scale_hi=tuple(hi.tolist()) if hi is not None else None,
    )
    return TrainingData(crops, names, mean, std, lo, hi, prep)


@dataclass
class Trainer:
    """Everything one training process holds: built by :func:`build`, advanced by :func:`train_one_epoch`, saved and
    resumed through :data:`STATE`."""

    cfg: TrainConfig
    data: TrainingData
    rank: int
    world: int
    device: torch.device
    student: MultiCropWrapper
    teacher: MultiCropWrapper
    model: nn.Module  # the student, wrapped in DDP when there are several processes
    loss_fn: DINOLoss
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler | None
    amp: torch.dtype | None
    augment: MultiCrop
    n_iter: int
    lr: np.ndarray
    wd: np.ndarray
    momentum: np.ndarray
    val: tuple[np.ndarray, np.ndarray] | None = None
    #: sum over this epoch's steps of the monitored values (:data:`MONITORED`), on the device
    stats: torch.Tensor | None = None

    def __post_init__(self) -> None:
        self.student_params = [p.detach() for p in self.student.parameters()]
        self.teacher_params = list(self.teacher.parameters())

    @property
    def global_batch(self) -> int:
        return self.cfg.batch_size_per_device * self.world


#: checkpoint entry -> (Trainer attribute, key prefix in DINO's layout): the one list that both saving and resuming
#: walk, so that they cannot drift apart
STATE: dict[str, tuple[str, str]] = {
    "student": ("student", "module."),
    "teacher": ("teacher", ""),
    "optimizer": ("optimizer", ""),
    "dino_loss": ("loss_fn", ""),
    "fp16_scaler": ("scaler", ""),
}


def build(cfg: TrainConfig, data: TrainingData | None = None, extend: bool = False) -> Trainer:
    """Data (``cfg.data`` unless ``data`` is given), networks, loss, optimiser and schedules of a run (the same initial
    weights in every process and every run). A folder that already holds a run is resumed only with that run's
    settings (``extend``: more epochs, recorded in its history; :mod:`scdino.training.record`); nothing is written
    before that is checked."""
    cfg, action = record.check(cfg, extend)
    rank, world, device = setup_distributed(cfg)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.out)
    if data is None:  # a path that is no cell source is refused before the run folder is made
        for path in (cfg.data, cfg.val_data):
            if path:
                source_type(path)(str(path), usable_options(path, cfg.cells())[0])
    fresh, marked = not out.exists(), (out / MARKER).is_file()
    if rank == 0:
        claim_dir(out, "scdino-train", inputs=[cfg.data, cfg.val_data])
        record.write(cfg, action)
    if world > 1:
        dist.barrier()  # every process has checked the run's record before rank 0 adds to it
    try:
        return _trainer(cfg, data if data is not None else prepare_data(cfg), rank, world, device)
    except BaseException:
        if rank == 0 and action == "start":  # refused before training: the run folder this command began goes again
            record.forget(out, fresh, marked)
        raise


def _trainer(cfg: TrainConfig, data: TrainingData, rank: int, world: int, device: torch.device) -> Trainer:
    """The networks, loss, optimiser and schedules of a run on ``data``."""
    torch.manual_seed(cfg.seed)  # the same initial weights in every process and every run
    student, teacher = build_networks(cfg, data.crops.shape[1])
    student, teacher = student.to(device), teacher.to(device)
    model = (
        nn.parallel.DistributedDataParallel(student, device_ids=[device.index] if device.type == "cuda" else None)
        if world > 1
        else student
    )
    loss_fn = DINOLoss(
        cfg.out_dim,
        2 + cfg.local_crops,
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
    gb = cfg.batch_size_per_device * world
    n_iter = len(data.crops) // gb
    if n_iter == 0:
        raise ScdinoError(
            f"{cfg.data}: {len(data.crops)} crops, fewer than one global batch ({gb}); lower --batch-size-per-device"
        )
    if cfg.max_iters_per_epoch:
        n_iter = min(n_iter, cfg.max_iters_per_epoch)

    def on_device(t):
        return t.to(device) if t is not None else None

    return Trainer(
        cfg=cfg,
        data=data,
        rank=rank,
        world=world,
        device=device,
        student=student,
        teacher=teacher,
        model=model,
        loss_fn=loss_fn,
        optimizer=optimizer,
        scaler=scaler,
        amp=amp,
        augment=MultiCrop(cfg, *map(on_device, (data.mean, data.std, data.lo, data.hi))),
        n_iter=n_iter,
        lr=cosine_scheduler(cfg.lr * gb / 256.0, cfg.min_lr, cfg.epochs, n_iter, cfg.warmup_epochs),
        wd=cosine_scheduler(cfg.weight_decay, cfg.weight_decay_end, cfg.epochs, n_iter),
        momentum=cosine_scheduler(cfg.momentum_teacher, 1.0, cfg.epochs, n_iter),
    )


def save_checkpoint(tr: Trainer, epoch: int, path: Path) -> None:
    """DINO's full-checkpoint layout (every entry of :data:`STATE`, ``epoch``, ``args``) plus scdino's metadata."""
    save: dict = {}
    for entry, (attr, prefix) in STATE.items():
        obj = getattr(tr, attr)
        save[entry] = {f"{prefix}{k}": v for k, v in obj.state_dict().items()} if obj is not None else None
    d = tr.data
    save.update(
        epoch=epoch,
        args=_args_namespace(tr.cfg),
        scdino={
            "channels": d.names,
            "mean": d.mean.tolist(),
            "std": d.std.tolist(),
            **({"scale_lo": d.lo.tolist(), "scale_hi": d.hi.tolist()} if d.lo is not None else {}),
            "arch": tr.cfg.arch_name,
            "input_size": tr.cfg.global_size,
            "crop_size": int(d.crops.shape[-1]),
            "precision": _amp_name(tr.amp),
            "data": tr.cfg.data,
        },
    )
    _atomic_save(save, path)


def resume(tr: Trainer, path: Path) -> int:
    """Load every entry of :data:`STATE` from the checkpoint at ``path``; returns the epochs it had finished."""
    from scdino.models.checkpoint import safe_load

    try:
        ck = safe_load(path)
    except CheckpointError as exc:
        raise CheckpointError(
            f"{path}: the run's last checkpoint cannot be read (damaged, or cut short while it was written); "
            f"{record.fallback_hint(path.parent)}"
        ) from exc
    for entry, (attr, prefix) in STATE.items():
        obj = getattr(tr, attr)
        if obj is not None and ck.get(entry) is not None:
            obj.load_state_dict({k.removeprefix(prefix): v for k, v in ck[entry].items()} if prefix else ck[entry])
    _check_resumed_scaling(path, ck.get("scdino") or {}, tr.data.lo, tr.data.hi)
    was, now = (ck.get("scdino") or {}).get("precision"), _amp_name(tr.amp)
    if was is not None and was != now and tr.rank == 0:
        log.warning(
            "%s was trained in %s so far and goes on in %s (precision=auto follows the machine): not bit for bit the "
            "run it would have been; --set precision=%s keeps it",
            path,
            was,
            now,
            was,
        )
    if tr.rank == 0:
        log.info("resuming %s after epoch %d", path, int(ck["epoch"]))
    return int(ck["epoch"])


def _log_line(logf, record: dict) -> None:
    if logf is not None:
        logf.write(json.dumps(record) + "\n")


def _step(tr: Trainer, epoch: int, it: int, order: torch.Tensor, logf) -> float:
    """One optimisation step of the student and the EMA update of the teacher; returns the loss."""
    cfg, bs, gb = tr.cfg, tr.cfg.batch_size_per_device, tr.global_batch
    gi = epoch * tr.n_iter + it
    idx = order[it * gb : (it + 1) * gb][tr.rank * bs : (tr.rank + 1) * bs]
    raw = tr.data.crops[idx].to(tr.device, non_blocking=True)
    views = tr.augment(raw, make_generator(cfg.seed, epoch, it, tr.device), gb, tr.rank * bs)
    torch.manual_seed(((cfg.seed * 1_000_003 + epoch) * 1_000_033 + it) * 131 + tr.rank)  # drop path
    for i, group in enumerate(tr.optimizer.param_groups):
        group["lr"] = float(tr.lr[gi])
        if i == 0:
            group["weight_decay"] = float(tr.wd[gi])
    with torch.autocast(tr.device.type, dtype=tr.amp or torch.float32, enabled=tr.amp is not None):
        t_out, t_emb = tr.teacher(views[:2], with_features=True)
        s_out = tr.model(views)
        loss = tr.loss_fn(s_out.float(), t_out.float(), epoch)
    if not math.isfinite(loss.item()):
        _log_line(logf, {"epoch": epoch + 1, "iteration": it, "error": "non-finite loss"})
        if logf is not None:
            logf.close()
        raise TrainingDiverged(
            f"loss is {loss.item()} at epoch {epoch + 1}, iteration {it}: training diverged. The last good "
            f"checkpoint ({Path(cfg.out) / 'checkpoint.pth'}) is kept; lower --set lr=... or use --set precision=fp32"
        )
    with torch.no_grad():  # monitoring (see MONITORED): stays on the device, summed over the epoch
        e = F.normalize(t_emb.float(), dim=-1)
        spread = e.std(0).mean() * math.sqrt(e.shape[1])
        stats = torch.cat([tr.loss_fn.last_stats, spread[None]])
        tr.stats = stats if tr.stats is None else tr.stats + stats
    tr.optimizer.zero_grad(set_to_none=True)
    if tr.scaler is not None:
        tr.scaler.scale(loss).backward()
        tr.scaler.unscale_(tr.optimizer)
    else:
        loss.backward()
    if cfg.clip_grad:
        clip_gradients(tr.student, cfg.clip_grad)
    cancel_last_layer_gradients(epoch, tr.student, cfg.freeze_last_layer)
    if tr.scaler is not None:
        tr.scaler.step(tr.optimizer)
        tr.scaler.update()
    else:
        tr.optimizer.step()
    with torch.no_grad():  # teacher = m * teacher + (1 - m) * student, every parameter in one fused pass
        m = float(tr.momentum[gi])
        tp, sp = tr.teacher_params, tr.student_params
        torch._foreach_mul_(tp, m)
        torch._foreach_add_(tp, sp, alpha=1 - m)
    value = loss.item()
    if tr.rank == 0 and (it % 10 == 0 or it == tr.n_iter - 1):
        record = {"epoch": epoch + 1, "iteration": it, "loss": value, "lr": float(tr.lr[gi]), "wd": float(tr.wd[gi])}
        _log_line(logf, {**record, "momentum": m})
    return value


#: what every epoch's summary reports about learning, besides the loss (means over the epoch's steps): the teacher's
#: entropy per cell and of its batch-mean output (nats, of the centred and sharpened targets; with the 256-wide
#: bottleneck a random head gives about ln K - 1.2 at temperature 0.04; the mean's is at most ln of the teacher outputs
#: a process sees), the student-teacher KL, and the spread of the teacher's embeddings across cells
#: (per-dimension std of the L2-normalised CLS tokens x sqrt(D): 0 when every cell maps to one point)
MONITORED = ("teacher_entropy", "teacher_mean_entropy", "kl", "embedding_spread")


def train_one_epoch(tr: Trainer, epoch: int, logf) -> dict:
    """One pass over the crops in this epoch's seeded order; returns the epoch's summary."""
    from tqdm.auto import tqdm

    from scdino.progress import duration, interval, on_terminal

    order = epoch_order(len(tr.data.crops), epoch, tr.cfg.seed)
    tr.student.train()
    t0 = last = time.perf_counter()
    losses = []
    tr.stats = None
    desc = f"epoch {epoch + 1}/{tr.cfg.epochs}"
    in_log = tr.rank == 0 and not on_terminal()  # a log file: a line every SCDINO_PROGRESS_SECONDS within the epoch
    bar = tqdm(range(tr.n_iter), desc=desc, disable=tr.rank != 0 or in_log, dynamic_ncols=True)
    for it in bar:
        losses.append(_step(tr, epoch, it, order, logf))
        if tr.rank == 0:
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
        now = time.perf_counter()
        if in_log and now - last >= interval() and it + 1 < tr.n_iter:
            last = now
            rate = (it + 1) / (now - t0)
            log.info(
                "%s: step %d/%d, loss %.4f, %.2f steps/s, %s left in this epoch",
                desc,
                it + 1,
                tr.n_iter,
                losses[-1],
                rate,
                duration((tr.n_iter - it - 1) / rate),
            )
    seconds = time.perf_counter() - t0
    mean_loss = torch.tensor(float(np.mean(losses)), device=tr.device)
    if tr.world > 1:  # the monitored values are averaged over the processes too (each over its own share)
        dist.all_reduce(mean_loss)
        mean_loss /= tr.world
        dist.all_reduce(tr.stats)
        tr.stats /= tr.world
    last = (epoch + 1) * tr.n_iter - 1
    summary = {
        "epoch": epoch + 1,
        "loss": float(mean_loss),
        **dict(zip(MONITORED, (tr.stats / tr.n_iter).tolist())),
        "seconds": seconds,
        "crops_per_s": tr.n_iter * tr.global_batch / seconds,
        "lr": float(tr.lr[last]),
        "wd": float(tr.wd[last]),
        "momentum": float(tr.momentum[last]),
        "teacher_temp": tr.loss_fn.teacher_temp(epoch),
    }
    if tr.val is not None and (epoch + 1) % tr.cfg.knn_freq == 0:
        emb = embed_crops(tr.teacher.backbone, tr.val[0], tr.data.prep, tr.device)
        knn = evaluate_knn(emb, tr.val[1], seed=tr.cfg.seed)
        summary["knn_top1"] = knn["top1"]
        summary["knn_balanced"] = knn["balanced_accuracy"]
    return summary


def baseline_epoch(cfg: TrainConfig) -> int:
    """The epoch whose teacher entropy later epochs are compared with: the first at the final teacher temperature."""
    return cfg.warmup_teacher_temp_epochs + 1


def health(summary: dict, first: dict | None, cfg: TrainConfig) -> list[str]:
    """Plain-language warnings about an epoch's summary: uniform collapse (every cell's target near uniform), one-cluster
    collapse (every cell gets the same target), and a teacher that has not sharpened after the warm-ups compared with
    ``first``, the summary of :func:`baseline_epoch` (None, e.g. a resumed run whose log lacks it: not judged)."""
    ln_k = math.log(cfg.out_dim)
    h, h_mean = summary["teacher_entropy"], summary["teacher_mean_entropy"]
    warm = max(cfg.warmup_epochs, cfg.warmup_teacher_temp_epochs, 2)  # a quick 2-epoch try is not judged
    out = []
    if h > 0.97 * ln_k and h_mean > 0.97 * ln_k:
        out.append(
            f"uniform collapse: the teacher's targets are near uniform over the {cfg.out_dim} outputs (entropy per "
            f"cell {h:.2f}, of the mean {h_mean:.2f}, ln K = {ln_k:.2f}); the student learns nothing from them. Early "
            "in a run this can pass; if it persists, lower teacher_temp, raise center_momentum, check the intensity "
            "scaling, or use a smaller out_dim"
        )
    elif h_mean < 0.1 * ln_k:
        out.append(
            f"one-cluster collapse: the teacher gives every cell the same target (entropy of its mean output "
            f"{h_mean:.2f} of ln K = {ln_k:.2f}); lower teacher_temp is not the fix: raise teacher_temp or "
            "center_momentum, lower lr, or use stronger augmentation"
        )
    elif first is not None and summary["epoch"] > max(warm, first["epoch"]) and h > 0.9 * first["teacher_entropy"]:
        out.append(
            f"the teacher has not sharpened in {summary['epoch']} epochs (entropy per cell {h:.2f}, "
            f"{first['teacher_entropy']:.2f} in epoch {first['epoch']}): the run is not learning yet. Typical fixes: "
            "faster teacher momentum for a short run (momentum_teacher 0.99), fewer or larger local crops, views that "
            "keep the whole cell"
        )
    return out


def _validation_data(cfg: TrainConfig, names: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """The labelled crops (``val_data``) k-NN is followed on, with the training channels."""
    vcrops, _, vtable = load_crops(cfg.val_data, CellOptions(channels=tuple(names)))
    return vcrops, labels_of(vtable, cfg.val_label_key, cfg.val_data).to_numpy()


def _epoch_line(s: dict, epochs: int, left: float) -> str:
    """One line per epoch for the terminal and the log: loss, teacher entropies, KL, lr, speed, k-NN where followed,
    time left."""
    from scdino.progress import duration

    knn = f", k-NN top-1 {s['knn_top1']:.3f}" if "knn_top1" in s else ""
    return (
        f"epoch {s['epoch']}/{epochs}: loss {s['loss']:.4f}, teacher entropy {s['teacher_entropy']:.2f} per cell / "
        f"{s['teacher_mean_entropy']:.2f} of the mean, KL {s['kl']:.3f}, spread {s['embedding_spread']:.3f}, "
        f"lr {s['lr']:.2e}, {s['crops_per_s']:.1f} crops/s, {s['seconds']:.0f} s{knn}; {duration(left)} left"
    )


def train(
    cfg: TrainConfig,
    data: TrainingData | None = None,
    val: tuple[np.ndarray, np.ndarray] | None = None,
    extend: bool = False,
) -> dict:
    """Train (or resume) into ``cfg.out``; returns a summary of the last epoch (``{"nothing_to_do": True, ...}`` when
    a resumed run has already finished). ``data`` (:func:`data_from_crops`) and ``val`` (crops, labels for k-NN)
    replace reading ``cfg.data`` and ``cfg.val_data``; ``extend`` continues a finished run to more epochs."""
    cfg.validate()
    tr = build(cfg, data, extend)
    cfg = tr.cfg
    out = Path(cfg.out)
    ckpt_path = out / "checkpoint.pth"
    if not ckpt_path.is_file() and record.numbered_checkpoints(out):  # never trained over from epoch 0
        raise CheckpointError(f"{ckpt_path}: missing; {record.fallback_hint(out)}")
    start = resume(tr, ckpt_path) if ckpt_path.is_file() else 0
    if start >= cfg.epochs:
        if tr.rank == 0:
            log.info(
                "%s: already trained for %d of %d epochs, nothing to do (to train longer: --extend --epochs N)",
                out,
                start,
                cfg.epochs,
            )
        return {"nothing_to_do": True, "epoch": start, "epochs": cfg.epochs}
    if cfg.knn_freq and tr.rank == 0:
        tr.val = val if val is not None else _validation_data(cfg, tr.data.names)
    if tr.rank == 0:  # what the settings will cost, before the first epoch
        from scdino.training.estimate import tell

        tell(cfg, tr.data.crops, tr.n_iter, tr.device)
    logf = open(out / "log.jsonl", "a") if tr.rank == 0 else None
    first = _summary_of(out / "log.jsonl", baseline_epoch(cfg)) if start else None
    summary: dict = {}
    seconds: list[float] = []
    for epoch in range(start, cfg.epochs):
        summary = train_one_epoch(tr, epoch, logf)
        seconds.append(summary["seconds"])
        if summary["epoch"] == baseline_epoch(cfg):
            first = summary
        if tr.rank == 0:
            log.info(_epoch_line(summary, cfg.epochs, float(np.mean(seconds)) * (cfg.epochs - epoch - 1)))
            summary["warnings"] = health(summary, first, cfg)
            for w in summary["warnings"]:
                log.warning("training check after epoch %d: %s", epoch + 1, w)
            _log_line(logf, {"summary": True, **summary})
            logf.flush()
            save_checkpoint(tr, epoch + 1, ckpt_path)
            if cfg.saveckp_freq and ((epoch + 1) % cfg.saveckp_freq == 0 or epoch + 1 == cfg.epochs):
                shutil.copyfile(ckpt_path, out / f"checkpoint{epoch + 1:04d}.pth")
        if tr.world > 1:
            dist.barrier()
    if logf:
        logf.close()
    return summary


def _summary_of(path: Path, epoch: int) -> dict | None:
    """Epoch ``epoch``'s summary in a run's log (what a resumed run compares the teacher's entropy with)."""
    if not path.is_file():
        return None
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if rec.get("summary") and rec.get("epoch") == epoch and "teacher_entropy" in rec:
            return rec
    return None
