"""``scdino.embed``: ``scdino-engine run`` as a function that returns the AnnData."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from scdino.engine.config import run_config
from scdino.engine.pipeline import run
from scdino.errors import ConfigError

if TYPE_CHECKING:
    import anndata

#: :func:`embed` without ``out`` keeps its result in memory only for inputs up to this size on disk
IN_MEMORY_MAX_BYTES = 2 * 1024**3


def _bytes_on_disk(path: Path) -> int:
    """The bytes of the files at ``path`` (a folder's, walked; for a LoadData CSV, its folder's, where its images
    usually are)."""
    root = path.parent if path.is_file() else path
    return sum(f.stat().st_size for f in root.rglob("*") if f.is_file())


def embed(
    source: str | os.PathLike, model: str = "default", out: str | os.PathLike | None = None, **options: Any
) -> anndata.AnnData:
    """Embed every cell of ``source`` with ``model``, as ``scdino-engine run SOURCE --out OUT --model MODEL`` does.

    ``options``: the run's options by their library names (``channels``, ``labels``, ``segment_channel``,
    ``crop_size``, ``sigma``, ``min_area``, ``backend``, ``precision``, ``overwrite``, ...; all of them:
    ``scdino.engine.config.OPTIONS``). Cell options not given come from the plate's stored settings, then from the
    defaults, as on the command line.

    With ``out`` the run writes the command's own store there (resumable: calling again continues an interrupted run
    or finds it complete) and returns it read back. Without ``out`` it writes a temporary store, reads it into memory
    and removes it: for inputs up to :data:`IN_MEMORY_MAX_BYTES` on disk (larger ones need ``out``).
    """
    import anndata as ad

    # absolute: the workers of a notebook's own Dask client need not share its working folder
    source = os.path.abspath(source) if Path(source).exists() else str(source)
    if out is not None:
        run(run_config(str(source), str(out), model=model, **options))
        return ad.read_zarr(str(out))
    path = Path(source)
    if not path.exists():
        raise ConfigError(f"{source}: no such plate, crop store or LoadData CSV; check the path")
    size = _bytes_on_disk(path)
    if size > IN_MEMORY_MAX_BYTES:
        raise ConfigError(
            f"{source}: {size / 1024**3:.1f} GB on disk; embed() keeps its result in memory only for inputs up to "
            f"{IN_MEMORY_MAX_BYTES / 1024**3:.0f} GB: pass out='cells.zarr' (a store on disk, resumable)"
        )
    tmp = tempfile.mkdtemp(prefix="scdino-embed-")
    try:
        store = os.path.join(tmp, "cells.zarr")
        run(run_config(str(source), store, model=model, **options))
        return ad.read_zarr(store)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # made above by this call: nothing else is in it
