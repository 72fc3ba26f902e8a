"""``scdino-engine ingest``: the paper's published data sets (a folder of single-cell TIFFs with one sub-folder per
class, channels last) into one crop store (:mod:`scdino.cells.cropstore`) that every command reads like a plate."""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import zarr

from scdino._optional import require
from scdino.cells.cropstore import ATTR
from scdino.cells.pixels import check_finite
from scdino.errors import ConfigError, InputError
from scdino.outputs import claim_new, discard, mark
from scdino.progress import Progress

log = logging.getLogger(__name__)

EXTS = (".tif", ".tiff")
COMMAND = "scdino-engine ingest"


def _read(tifffile, path: Path, channels_last: bool) -> np.ndarray:
    """One crop as (c, y, x); a file that is not a readable TIFF is one clear error naming it."""
    try:
        img = tifffile.imread(path)
    except (ValueError, EOFError) as exc:  # tifffile.TiffFileError is a ValueError; a file cut short, an EOFError
        raise InputError(
            f"{path}: not a readable TIFF ({type(exc).__name__}: {str(exc)[:200]}); replace it with the crop, or "
            "move it out of the folder"
        ) from exc
    return _to_cyx(img, str(path), channels_last)


def _to_cyx(img: np.ndarray, where: str, channels_last: bool) -> np.ndarray:
    if img.ndim == 2:
        return img[None]
    if img.ndim != 3:
        raise InputError(f"{where}: image of shape {img.shape}; expected (y, x) or (y, x, channels)")
    return np.moveaxis(img, -1, 0) if channels_last else img


def ingest(
    folder: str | os.PathLike,
    out: str | os.PathLike,
    channels: Sequence[str] | None = None,
    channels_last: bool = True,
    chunk: int = 1024,
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """Read ``folder/<class>/*.tif`` into a crop store at ``out``; returns its attributes."""
    tifffile = require("tifffile")
    folder, out = Path(folder), str(out)
    if not folder.is_dir():
        raise InputError(f"{folder}: not a folder; expected one sub-folder of single-cell TIFFs per class")
    classes = sorted(d.name for d in folder.iterdir() if d.is_dir())
    files = [(c, p) for c in classes for p in sorted((folder / c).iterdir()) if p.suffix.lower() in EXTS]
    if not files:
        raise InputError(
            f"{folder}: no .tif files in class sub-folders (found folders: {', '.join(classes) or 'none'})"
        )
    first = _read(tifffile, files[0][1], channels_last)
    c = first.shape[0]
    if first.shape[1] != first.shape[2]:
        raise InputError(f"{files[0][1]}: crop of {first.shape[1]}x{first.shape[2]} px; expected square crops")
    names = list(channels) if channels else [str(i) for i in range(c)]
    if len(names) != c:
        raise ConfigError(f"--channels names {len(names)} channels, the crops have {c}")
    claim_new(out, COMMAND, inputs=[folder], overwrite=overwrite, option="OUT")
    try:
        return _write(tifffile, folder, out, files, classes, first, names, channels_last, chunk, progress)
    except BaseException:
        discard(out, COMMAND)  # a store cut short is not left behind (a rerun makes it whole)
        raise


def _write(tifffile, folder: Path, out: str, files, classes, first, names, channels_last, chunk, progress) -> dict:
    c, s = first.shape[0], first.shape[1]
    root = zarr.open_group(out, mode="w", zarr_format=3)
    mark(out, COMMAND)
    arr = root.create_array("crops", shape=(len(files), c, s, s), chunks=(chunk, c, s, s), dtype=first.dtype)
    buf = np.zeros((min(chunk, len(files)), c, s, s), first.dtype)
    with Progress(len(files), "ingest", "crop", progress) as bar:
        for a in range(0, len(files), chunk):
            part = files[a : a + chunk]
            for i, (_, p) in enumerate(part):
                img = _read(tifffile, p, channels_last)
                if img.shape != (c, s, s) or img.dtype != first.dtype:
                    raise InputError(
                        f"{p}: crop {img.shape} {img.dtype}; the first crop ({files[0][1].name}) is "
                        f"{(c, s, s)} {first.dtype}: every crop of a store must have the same shape"
                    )
                check_finite(img, str(p), names)
                buf[i] = img
            arr[a : a + len(part)] = buf[: len(part)]
            bar.update(len(part))
    obs = pd.DataFrame(
        {
            "class": pd.Categorical([k for k, _ in files], categories=classes),
            "path": [str(p.relative_to(folder)) for _, p in files],
        }
    )
    obs.index = obs["path"].values
    from anndata.io import write_elem

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=UserWarning)
        write_elem(root, "obs", obs)
    meta = {
        "channels": names,
        "crop_size": s,
        "dtype": str(first.dtype),
        "source": str(folder.resolve()),
        "n": len(files),
        "classes": classes,
    }
    root.attrs[ATTR] = meta
    return meta
