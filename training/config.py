"""Typed training configuration: every hyperparameter of the scDINO recipe (SPEC section 5) as the default."""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from scdino.cells.options import CellOptions, SegmentParams
from scdino.cells.stored import stored_settings
from scdino.defaults import INPUT_SIZE
from scdino.errors import ConfigError
from scdino.outputs import recognise_config

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    # data
    data: str = ""
    out: str = ""
    channels: list[str] | None = None
    labels: str | None = None  # nucleus label image of a plate (else segmentation)
    wells: list[str] | None = None  # plate data: only these wells
    segment_channel: str | None = None
    crop_size: int | None = None  # crops cut from a plate (None: 64 px); crop stores keep their own size
    # plate segmentation, as scdino-engine run's options (defaults from scdino.cells.options.SegmentParams)
    sigma: float = SegmentParams.sigma
    threshold: str = SegmentParams.threshold
    min_distance: int = SegmentParams.min_distance
    min_area: int = SegmentParams.min_area
    max_area: int = SegmentParams.max_area
    val_data: str | None = None  # labelled crop store (scdino-engine ingest) for k-NN monitoring
    val_label_key: str = "class"
    # intensity scaling of every crop before augmentation; stored with the model and applied by every backend
    intensity_scaling: str = "crop"  # crop: each crop and channel min-max scaled (the paper) | dataset: fixed range
    intensity_percentiles: tuple[float, float] = (0.1, 99.9)  # dataset: the range, percentiles of training pixels
    # model
    arch: str = "vit_small"
    patch: int = 16
    init: str = "scratch"  # scratch | dino_vits16 (hub name) | a checkpoint file
    drop_path: float = 0.1
    out_dim: int = 65536
    head_hidden: int = 2048
    head_bottleneck: int = 256
    norm_last_layer: bool = True
    # multi-crop
    global_size: int = INPUT_SIZE
    local_size: int = 96
    local_crops: int = 8
    global_scale: tuple[float, float] = (0.4, 1.0)
    local_scale: tuple[float, float] = (0.05, 0.4)
    aspect_ratio: tuple[float, float] = (3 / 4, 4 / 3)  # of the random-resized boxes (1,1: never change the aspect)
    centre_views: bool = False  # every view keeps the crop centre (the cell) in its middle half
    flip_p: float = 0.5
    rotation: float = 0.0  # views rotated by a random angle in [-rotation, rotation] degrees (180: any angle)
    brightness: tuple[float, float] = (0.5, 1.25)
    brightness_p: float = 0.8
    brightness_per_channel: bool = True  # False: one factor per view for all channels (keeps channel ratios)
    blur_p: tuple[float, float, float] = (1.0, 0.1, 0.5)  # global 1, global 2, locals
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    solarize_p: float = 0.2  # global 2
    # optimisation
    epochs: int = 100
    batch_size_per_device: int = 30
    lr: float = 5e-4  # for a global batch of 256; scaled linearly
    min_lr: float = 1e-6
    warmup_epochs: int = 10
    weight_decay: float = 0.04
    weight_decay_end: float = 0.4
    clip_grad: float = 3.0
    freeze_last_layer: int = 1
    momentum_teacher: float = 0.996
    student_temp: float = 0.1
    teacher_temp: float = 0.04
    warmup_teacher_temp: float = 0.04
    warmup_teacher_temp_epochs: int = 0
    center_momentum: float = 0.9
    # auto: bf16 autocast on GPUs that have it (else fp16 with loss scaling) and on CPUs with native bf16 (avx512_bf16
    # or AMX), fp32 on other CPUs | fp32 | fp16 | bf16
    precision: str = "auto"
    # run
    seed: int = 0
    saveckp_freq: int = 20
    knn_freq: int = 0  # epochs between k-NN checks on val_data (0: never)
    device: str = "auto"
    threads: int | None = None
    max_iters_per_epoch: int | None = None  # for smoke tests and benchmarks
    # recompute each ViT block in the backward pass instead of keeping its activations: the same loss and gradients,
    # ~1/3 more compute, several times less memory where the backbone's activations dominate (large views)
    activation_checkpointing: bool = False

    def validate(self) -> "TrainConfig":
        if not self.data or not self.out:
            raise ConfigError("--data and --out are required")
        for name in ("epochs", "batch_size_per_device", "global_size", "local_size", "patch", "out_dim"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if self.global_size % self.patch or self.local_size % self.patch:
            raise ConfigError(
                f"crop sizes {self.global_size}/{self.local_size} must be multiples of the patch {self.patch}"
            )
        long = [n for n in ("warmup_epochs", "warmup_teacher_temp_epochs") if getattr(self, n) > self.epochs]
        if long:
            have = ", ".join(f"{n} {getattr(self, n)}" for n in long)
            fix = " ".join(f"--set {n}=N" for n in long)
            raise ConfigError(
                f"{have} cannot exceed epochs ({self.epochs}); lower it ({fix} with N <= {self.epochs}) or raise --epochs"
            )
        if not 0 <= self.rotation <= 180:
            raise ConfigError(f"rotation {self.rotation}: expected degrees between 0 (off) and 180 (any angle)")
        if len(self.aspect_ratio) != 2 or not 0 < self.aspect_ratio[0] <= self.aspect_ratio[1]:
            raise ConfigError(f"aspect_ratio {self.aspect_ratio}: expected two values 0 < low <= high (1,1: no change)")
        for name in ("global_scale", "local_scale"):
            lo, hi = getattr(self, name)
            if not 0 < lo <= hi <= 1:
                raise ConfigError(f"{name} ({lo}, {hi}): expected area fractions 0 < low <= high <= 1")
        if self.precision not in ("auto", "fp32", "fp16", "bf16"):
            raise ConfigError(f"precision {self.precision!r}: expected auto, fp32, fp16 or bf16")
        if self.intensity_scaling not in ("crop", "dataset"):
            raise ConfigError(
                f"intensity_scaling {self.intensity_scaling!r}: expected crop (per-crop min-max, the paper) or dataset "
                "(one fixed range per channel from the training crops, keeps absolute marker levels)"
            )
        if len(self.intensity_percentiles) != 2:
            raise ConfigError(f"intensity_percentiles {self.intensity_percentiles}: expected two values, low,high")
        lo, hi = self.intensity_percentiles
        if not 0 <= lo < hi <= 100:
            raise ConfigError(f"intensity_percentiles {self.intensity_percentiles}: expected 0 <= low < high <= 100")
        if self.knn_freq and not self.val_data:
            raise ConfigError("knn_freq needs val_data (a labelled crop store)")
        return self

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def arch_name(self) -> str:
        return f"{self.arch}{self.patch}"

    def cells(self) -> CellOptions:
        """How the training cells are found and cut (as ``scdino-engine run`` does)."""
        seg = SegmentParams(self.sigma, self.threshold, self.min_distance, self.min_area, self.max_area)
        return CellOptions(
            channels=tuple(self.channels) if self.channels else None,
            labels=self.labels,
            segment_channel=self.segment_channel,
            crop_size=self.crop_size,
            wells=tuple(self.wells) if self.wells else None,
            segment=seg,
        )


#: a run folder older than the marker: its config.json has these keys, and a checkpoint.pth lies beside it
recognise_config(("global_size", "local_crops", "out_dim", "teacher_temp", "intensity_scaling"), "checkpoint.pth",
                 "scdino-train")  # fmt: skip


def _coerce(f: dataclasses.Field, value: Any) -> Any:
    t = str(f.type)
    if isinstance(value, str):
        if value.lower() in ("none", "null") and "None" in t:
            return None
        if t.startswith("tuple") or t.startswith("list"):
            parts = [v.strip() for v in value.strip("()[]").split(",") if v.strip()]
            conv = float if "float" in t else str
            try:
                vals = [conv(p) for p in parts]
            except ValueError:
                raise ConfigError(f"{f.name}={value!r}: expected numbers separated by commas") from None
            return tuple(vals) if t.startswith("tuple") else vals
        if t.startswith("bool"):
            if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ConfigError(f"{f.name}={value!r}: expected true or false")
            return value.lower() in ("true", "1", "yes")
        try:
            if t.startswith("int"):
                return int(value)
            if t.startswith("float"):
                return float(value)
        except ValueError:
            kind = "a whole number" if t.startswith("int") else "a number"
            raise ConfigError(f"{f.name}={value!r}: expected {kind}") from None
    if isinstance(value, list) and t.startswith("tuple"):
        return tuple(value)
    return value


def build_config(file: str | None = None, sets: list[str] | tuple[str, ...] = (), **options: Any) -> TrainConfig:
    """Defaults <- the data's stored cell settings <- config file (YAML or JSON) <- command-line options <- ``--set
    key=value``."""
    known = {f.name: f for f in fields(TrainConfig)}
    values: dict[str, Any] = {}
    if file:
        text = Path(file).read_text()
        try:
            import yaml

            try:
                loaded = yaml.safe_load(text)
            except yaml.YAMLError as exc:
                raise ConfigError(f"{file}: not valid YAML ({str(exc).splitlines()[0]})") from None
        except ImportError:
            try:
                loaded = json.loads(text)
            except json.JSONDecodeError as exc:
                raise ConfigError(f"{file}: not valid JSON ({exc})") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{file}: expected a mapping of option: value")
        values.update(loaded)
    values.update({k: v for k, v in options.items() if v is not None})
    for s in sets:
        if "=" not in s:
            raise ConfigError(f"--set {s!r}: expected key=value")
        k, v = s.split("=", 1)
        values[k.strip().replace("-", "_")] = v.strip()
    if values.get("data"):  # what the plate carries (scdino.cells.stored), where not given: as scdino-engine run does
        stored = stored_settings(values["data"])
        values.update({k: v for k, v in stored.items() if k in known and k not in values})
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ConfigError(f"unknown option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    cfg = TrainConfig(**{k: _coerce(known[k], v) for k, v in values.items()})
    return _fit_warmup(cfg, given=set(values)).validate()


def _fit_warmup(cfg: TrainConfig, given: set[str]) -> TrainConfig:
    """A run shorter than the recipe's default warmup (a quick try) gets the recipe's proportion of it, a tenth of the
    run, with a warning; a warmup the user set longer than the run stays an error (:meth:`TrainConfig.validate`)."""
    default = TrainConfig.warmup_epochs
    if "warmup_epochs" in given or cfg.warmup_epochs <= cfg.epochs:
        return cfg
    scaled = cfg.epochs * default // TrainConfig.epochs
    log.warning(
        "the recipe's lr warmup of %d epochs is longer than this %d-epoch run; using %d (the recipe's tenth of the "
        "run), recorded in config.json; set warmup_epochs to choose",
        default,
        cfg.epochs,
        scaled,
    )
    return dataclasses.replace(cfg, warmup_epochs=scaled)
