"""Options of ``scdino-engine run``: the one home of their defaults (the command line reads them from here).

Light on purpose (no numpy, torch, dask or zarr), so that ``--help`` shows the defaults without importing them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from scdino.bounds import check, check_segmentation
from scdino.cells.options import CellOptions
from scdino.errors import ConfigError

#: the backends' own default batch (a BackendSpec made without one)
DEFAULT_BATCH_SIZE = 64
#: tokens one forward pass on a CPU holds (crops x tokens per crop): small enough that its activations stay in cache,
#: large enough that a small model's per-call cost is spread (python benchmarks/cpu_settings.py)
CPU_BATCH_TOKENS = 3200


def cpu_batch_size(tokens: int) -> int:
    """Crops per forward pass on a CPU for a model that sees ``tokens`` tokens per crop: the power of two nearest to
    :data:`CPU_BATCH_TOKENS` / ``tokens``, from 16 to 256. Measured best on the 2-core CPU, both backends: ViT-S/16 at
    224 px (197 tokens) 16, 13-20% faster than 64; ViT-S/16 at 112 (50) 64, ONNX Runtime within 2% of 16;
    ViT-tiny/8 at 48 (37) 64, 11-17% faster than 16; ViT-tiny/16 at 32 (5) 256, PyTorch 2.06x batch 16."""
    best = CPU_BATCH_TOKENS / max(1, tokens)
    return int(min(256, max(16, 2 ** round(math.log2(best)))))


#: tokens one forward pass on a GPU holds: ViT-S/16 at 224 px (197 tokens per crop) runs 256 crops per pass, the
#: largest batch its TensorRT plans are built for (``scdino-export tensorrt --max-batch``); a larger model runs
#: fewer, so that one pass's activations stay the size of ViT-S/16's at 256 on an analysis PC's smaller GPU
GPU_BATCH_TOKENS = 256 * 197


def gpu_batch_size(tokens: int) -> int:
    """Crops per forward pass on a GPU for a model that sees ``tokens`` tokens per crop: the power of two nearest to
    :data:`GPU_BATCH_TOKENS` / ``tokens``, from 32 to 256 (ViT-S/16 at 224 px: 256; ViT-B/8 at 224, 785 tokens:
    64). ``python benchmarks/gpu_check.py`` measures ViT-S/16 at batch 64, 128 and 256 on the device."""
    best = GPU_BATCH_TOKENS / max(1, tokens)
    return int(min(256, max(32, 2 ** round(math.log2(best)))))


#: the values of --precision (the first is the default)
PRECISIONS = ("auto", "fp32", "int8")


@dataclass(frozen=True)
class RunConfig:
    """Options of ``scdino-engine run`` (see its ``--help``)."""

    plate: str
    out: str
    model: str = "default"
    cells: CellOptions = field(default_factory=CellOptions)
    checkpoint_key: str = "teacher"
    adapt: str = "mean"
    input_size: int | None = None
    backend: str = "auto"
    device: str = "auto"
    #: None: cpu_batch_size() of the model on a CPU, gpu_batch_size() on a GPU (never more than a block)
    batch_size: int | None = None
    #: worker processes of a local cluster; None: 1 on the CPU, one per visible GPU on CUDA
    workers: int | None = None
    threads: int | None = None
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

    def validate(self) -> None:
        """Refuse options that are out of bounds (:mod:`scdino.bounds`) or contradict each other."""
        cells = self.cells
        check(
            batch_size=self.batch_size,
            chunk_cells=self.chunk_cells,
            workers=self.workers,
            threads=self.threads,
            input_size=self.input_size,
            crop_size=cells.crop_size,
            crop_um=cells.crop_um,
        )
        check_segmentation(**cells.segment.to_dict())
        if self.precision not in PRECISIONS:
            raise ConfigError(f"--precision {self.precision!r}: expected {', '.join(PRECISIONS)}")
        if self.fast and (self.input_size is not None or self.precision != "auto"):
            raise ConfigError("--fast sets the input size and the precision itself; drop --input-size / --precision")
        if self.cells.crop_size is not None and self.cells.crop_um is not None:
            raise ConfigError("pass either --crop-size (pixels) or --crop-um (micrometres), not both")
