"""Options of ``scdino-engine run``: the one home of their defaults (the command line reads them from here).

Light on purpose (no numpy, torch, dask or zarr), so that ``--help`` shows the defaults without importing them.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from scdino.batches import (
    CPU_BATCH_TOKENS,
    DEFAULT_BATCH_SIZE,
    GPU_BATCH_TOKENS,
    cpu_batch_size,
    gpu_batch_size,
)
from scdino.bounds import SEED, Bound, bounded, check_fields, declare
from scdino.cells.options import CellOptions, SegmentParams
from scdino.defaults import ADAPT, BATCH_SIZE_BOUND, CHECKPOINT_KEY, INPUT_SIZE_BOUND
from scdino.errors import ConfigError

#: the batch rules live in :mod:`scdino.batches` (export builds plans for them too); here for the engine's readers
__all__ = [
    "CPU_BATCH_TOKENS",
    "DEFAULT_BATCH_SIZE",
    "GPU_BATCH_TOKENS",
    "RunConfig",
    "cpu_batch_size",
    "run_config",
    "gpu_batch_size",
]


#: the values of --precision (the first is the default)
PRECISIONS = ("auto", "fp32", "int8")
#: the values of --tta: none, the four axis flips, or all eight flips and quarter turns (scdino.engine.tta)
TTA_MODES = ("none", "flips", "d8")


@declare
@dataclass(frozen=True)
class RunConfig:
    """Options of ``scdino-engine run`` (see its ``--help``)."""

    plate: str
    out: str
    model: str = "default"
    cells: CellOptions = field(default_factory=CellOptions)
    checkpoint_key: str = CHECKPOINT_KEY
    adapt: str = ADAPT
    input_size: int | None = bounded(None, INPUT_SIZE_BOUND)
    backend: str = "auto"
    device: str = "auto"
    #: None: cpu_batch_size() of the model on a CPU, gpu_batch_size() on a GPU (never more than a block)
    batch_size: int | None = bounded(None, BATCH_SIZE_BOUND)
    #: worker processes of a local cluster; None: 1 on the CPU, one per visible GPU on CUDA
    workers: int | None = bounded(None, Bound("worker processes", low=1, integer=True))
    threads: int | None = bounded(None, Bound("torch threads per worker", low=1, integer=True))
    #: feeder processes per worker that find cells and cut crops (scdino.engine.feed); None: one per core, 0: none
    feeders: int | None = bounded(None, Bound("feeder processes per worker; 0: none", low=0, high=256, integer=True))
    scheduler: str | None = None
    chunk_cells: int = bounded(256, Bound("cells per block", low=1, integer=True))
    overwrite: bool = False
    #: on a CPU, run a checkpoint through its cached, verified ONNX export when that measures faster
    export_cache: bool = True
    #: auto (int8 where verified on the run's own crops, see scdino.engine.precision), fp32, or int8
    precision: str = "auto"
    #: fast mode: int8 at half the model's input size (rounded down to whole patches); see the README for its cost
    fast: bool = False
    progress: bool = True
    seed: int = bounded(0, SEED)
    #: test-time augmentation: the embedding averaged over these transforms of each crop (see TTA_MODES)
    tta: str = "none"
    #: where each cell setting that is not a default came from: (name, "option" | "plate"), see run_config()
    cells_from: tuple[tuple[str, str], ...] = ()

    def validate(self) -> None:
        """Refuse options that are out of their fields' bounds (theirs, and the cell options') or contradict each
        other."""
        check_fields(self)
        self.cells.segment.validate()
        if self.tta not in TTA_MODES:
            raise ConfigError(f"--tta {self.tta!r}: expected {', '.join(TTA_MODES)}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"--precision {self.precision!r}: expected {', '.join(PRECISIONS)}")
        if self.fast and (self.input_size is not None or self.precision != "auto"):
            raise ConfigError("--fast sets the input size and the precision itself; drop --input-size / --precision")
        if self.cells.crop_size is not None and self.cells.crop_um is not None:
            raise ConfigError("pass either --crop-size (pixels) or --crop-um (micrometres), not both")


def check_block_memory(chunk_cells: int, channels: int, crop: int, itemsize: int, available: int) -> None:
    """Refuse blocks whose crops do not fit in memory: one block of ``chunk_cells`` crops (``channels`` x ``crop`` x
    ``crop`` pixels of ``itemsize`` bytes) is held as read and as float32 for the model, and must take at most half
    of the ``available`` bytes (the rest is for the model, the next block being read and everything else)."""
    need = chunk_cells * channels * crop * crop * (itemsize + 4)
    if need > available // 2:
        raise ConfigError(
            f"--crop-size {crop} with --chunk-cells {chunk_cells}: one block of {channels}-channel crops takes "
            f"{need / 2**30:.2f} GiB (as read and as float32), more than half of the {available / 2**30:.2f} GiB of "
            "memory available; pass a smaller --chunk-cells or --crop-size"
        )


#: the cell options of a run, flat (CellOptions' fields with its segmentation's): how run_config() takes them
CELL_OPTIONS = tuple(f.name for f in fields(CellOptions) if f.name != "segment")
SEGMENT_OPTIONS = tuple(f.name for f in fields(SegmentParams))
#: every option of a run besides the input and the output, by its RunConfig name
OPTIONS = (
    tuple(f.name for f in fields(RunConfig) if f.name not in ("plate", "out", "cells", "cells_from"))
    + CELL_OPTIONS
    + SEGMENT_OPTIONS
)


def _names(value: Any) -> tuple[str, ...] | None:
    """``"A,B"`` or a sequence of names or indices -> a tuple of strings (None stays None)."""
    if value is None:
        return None
    items = value.split(",") if isinstance(value, str) else value
    return tuple(str(v).strip() for v in items if str(v).strip()) or None


def run_config(plate: str, out: str, **options: Any) -> RunConfig:
    """The RunConfig of a run of ``plate`` into ``out`` with ``options`` (flat, by their :data:`OPTIONS` names): the
    one place the command line and :func:`scdino.embed` build it. A cell option not given is taken from the plate's
    stored settings (:mod:`scdino.cells.stored`), else from its default; ``cells_from`` records which came from where.
    """
    from scdino.cells.stored import stored_settings

    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise ConfigError(f"unknown option(s) {', '.join(unknown)}; expected some of {', '.join(OPTIONS)}")
    given = {k: v for k, v in options.items() if k in CELL_OPTIONS + SEGMENT_OPTIONS}
    stored = {k: v for k, v in stored_settings(plate).items() if k not in given}
    cell = {**stored, **given}
    for name in ("channels", "wells"):
        if name in cell:
            cell[name] = _names(cell[name])
    if "threshold" in cell:
        cell["threshold"] = str(cell["threshold"])
    cells = CellOptions(
        **{k: cell[k] for k in CELL_OPTIONS if k in cell},
        segment=SegmentParams(**{k: cell[k] for k in SEGMENT_OPTIONS if k in cell}),
    )
    origin = tuple(sorted([(k, "option") for k in given] + [(k, "plate") for k in stored]))
    rest = {k: v for k, v in options.items() if k not in given}
    return RunConfig(plate=str(plate), out=str(out), cells=cells, cells_from=origin, **rest)
