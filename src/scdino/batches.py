"""How many crops one forward pass takes: the one home of the batch rules of every path (the engine's backends, the
in-process helpers, the TensorRT plans ``scdino-export`` builds). Plain numbers, no torch."""

from __future__ import annotations

import math

from scdino.errors import ConfigError

#: the largest batch any path runs in one pass, and the largest a TensorRT plan is built for (``scdino-export
#: tensorrt --max-batch``), so that a plan takes every batch the engine gives it
MAX_BATCH = 256
#: crops per pass of the in-process helpers (:func:`scdino.models.embed_crops`: k-NN monitoring, baselines)
EMBED_BATCH_SIZE = MAX_BATCH // 2

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
    return int(min(MAX_BATCH, max(16, 2 ** round(math.log2(best)))))


#: tokens one forward pass on a GPU holds: ViT-S/16 at 224 px (197 tokens per crop) runs :data:`MAX_BATCH` crops per
#: pass; a larger model runs fewer, so that one pass's activations stay the size of ViT-S/16's at that batch on an
#: analysis PC's smaller GPU
GPU_BATCH_TOKENS = MAX_BATCH * 197


def gpu_batch_size(tokens: int) -> int:
    """Crops per forward pass on a GPU for a model that sees ``tokens`` tokens per crop: the power of two nearest to
    :data:`GPU_BATCH_TOKENS` / ``tokens``, from 32 to 256 (ViT-S/16 at 224 px: 256; ViT-B/8 at 224, 785 tokens:
    64). ``python benchmarks/gpu_check.py`` measures ViT-S/16 at batch 64, 128 and 256 on the device."""
    best = GPU_BATCH_TOKENS / max(1, tokens)
    return int(min(MAX_BATCH, max(32, 2 ** round(math.log2(best)))))


def plan_batches(tokens: int, opt: int | None = None, max_batch: int = MAX_BATCH) -> tuple[int, int, int]:
    """The (min, opt, max) batch of a TensorRT plan's optimisation profile for a model that sees ``tokens`` tokens per
    crop. ``opt`` None: the batch ``scdino-engine run`` sends that model on a GPU (:func:`gpu_batch_size`; a run's
    blocks, 256 cells by default, are never smaller), capped at ``max_batch``; the TensorRT backend sends batches of the
    plan's opt, so the plan is tuned for the batches it gets. ViT-S/16 at 224 px: (1, 256, 256); ViT-S/16 at 320 px
    (401 tokens): (1, 128, 256); ViT-B/8 at 224 (785 tokens): (1, 64, 256)."""
    if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
        raise ConfigError(f"--max-batch {max_batch!r}: expected a whole number of at least 1")
    if opt is None:
        return 1, min(gpu_batch_size(tokens), max_batch), max_batch
    if isinstance(opt, bool) or not isinstance(opt, int) or not 1 <= opt <= max_batch:
        raise ConfigError(
            f"--opt-batch {opt!r}: expected a whole number from 1 to --max-batch ({max_batch}); leave it out for the "
            f"batch the engine sends this model on a GPU ({min(gpu_batch_size(tokens), max_batch)})"
        )
    return 1, opt, max_batch
