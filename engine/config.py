"""Options of ``scdino-engine run``: the one home of their defaults (the command line reads them from here).

Light on purpose (no numpy, torch, dask or zarr), so that ``--help`` shows the defaults without importing them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from scdino.batches import CPU_BATCH_TOKENS, DEFAULT_BATCH_SIZE, GPU_BATCH_TOKENS, cpu_batch_size, gpu_batch_size
from scdino.bounds import check, check_segmentation
from scdino.cells.options import CellOptions
from scdino.errors import ConfigError
from scdino.models.defaults import ADAPT, CHECKPOINT_KEY

#: the batch rules live in :mod:`scdino.batches` (export builds plans for them too); here for the engine's readers
__all__ = [
    "CPU_BATCH_TOKENS",
    "DEFAULT_BATCH_SIZE",
    "GPU_BATCH_TOKENS",
    "RunConfig",
    "cpu_batch_size",
    "gpu_batch_size",
]


#: the values of --precision (the first is the default)
PRECISIONS = ("auto", "fp32", "int8")
#: the values of --tta: none, the four axis flips, or all eight flips and quarter turns (scdino.engine.tta)
TTA_MODES = ("none", "flips", "d8")


@dataclass(frozen=True)
class RunConfig:
    """Options of ``scdino-engine run`` (see its ``--help``)."""

    plate: str
    out: str
    model: str = "default"
    cells: CellOptions = field(default_factory=CellOptions)
    checkpoint_key: str = CHECKPOINT_KEY
    adapt: str = ADAPT
    input_size: int | None = None
    backend: str = "auto"
    device: str = "auto"
    #: None: cpu_batch_size() of the model on a CPU, gpu_batch_size() on a GPU (never more than a block)
    batch_size: int | None = None
    #: worker processes of a local cluster; None: 1 on the CPU, one per visible GPU on CUDA
    workers: int | None = None
    threads: int | None = None
    #: feeder processes per worker that find cells and cut crops (scdino.engine.feed); None: one per core, 0: none
    feeders: int | None = None
    scheduler: str | None = None
    chunk_cells: int = 256
    overwrite: bool = False
    #: on a CPU, run a checkpoint through its cached, verified ONNX export when that measures faster
    export_cache: bool = True
    #: auto (int8 where verified on the run's own crops, see scdino.engine.precision), fp32, or int8
    precision: str = "auto"
    #: fast mode: int8 at half the model's input size (rounded down to whole patches); see the README for its cost
    fast: bool = False
    progress: bool = True
    seed: int = 0
    #: test-time augmentation: the embedding averaged over these transforms of each crop (see TTA_MODES)
    tta: str = "none"

    def validate(self) -> None:
        """Refuse options that are out of bounds (:mod:`scdino.bounds`) or contradict each other."""
        cells = self.cells
        check(
            batch_size=self.batch_size,
            chunk_cells=self.chunk_cells,
            workers=self.workers,
            threads=self.threads,
            feeders=self.feeders,
            input_size=self.input_size,
            crop_size=cells.crop_size,
            crop_um=cells.crop_um,
        )
        check_segmentation(**cells.segment.to_dict())
        if self.tta not in TTA_MODES:
            raise ConfigError(f"--tta {self.tta!r}: expected {', '.join(TTA_MODES)}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"--precision {self.precision!r}: expected {', '.join(PRECISIONS)}")
        if self.fast and (self.input_size is not None or self.precision != "auto"):
            raise ConfigError("--fast sets the input size and the precision itself; drop --input-size / --precision")
        if self.cells.crop_size is not None and self.cells.crop_um is not None:
            raise ConfigError("pass either --crop-size (pixels) or --crop-um (micrometres), not both")
