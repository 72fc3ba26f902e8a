"""Crop stores: single-cell crops already cut (e.g. the paper's published data sets, ingested by ``scdino-engine
ingest``), in one zarr store that every command reads like a plate.

Layout: ``crops`` (n, C, S, S) raw dtype, chunked along cells; ``obs`` (AnnData dataframe) with ``class`` and
``path`` (every row keeps its source file, so labels can never be misaligned with features); root attribute
``scdino_crops`` = {channels, crop_size, dtype, source}.
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np
import pandas as pd
import zarr

from scdino.cells.pixels import check_finite
from scdino.cells.plate import read_array
from scdino.errors import InputError
from scdino.outputs import recognise_zarr

ATTR = "scdino_crops"
recognise_zarr(ATTR, "scdino-engine ingest")  # a crop store older than the marker


def is_crop_store(path: str | os.PathLike) -> bool:
    try:
        return ATTR in zarr.open_group(str(path), mode="r", use_consolidated=False).attrs
    except Exception:  # not a zarr group at all
        return False


class CropStore:
    """An opened crop store: the cell table and the raw crops (picklable by path)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = str(path)
        g = zarr.open_group(self.path, mode="r", use_consolidated=False)
        if ATTR not in g.attrs:
            raise InputError(
                f"{self.path}: not a scdino crop store (no {ATTR} attribute); make one with "
                "'scdino-engine ingest FOLDER OUT.zarr'"
            )
        self.meta = dict(g.attrs[ATTR])
        self.channels = list(self.meta["channels"])
        self.crop_size = int(self.meta["crop_size"])

    def __reduce__(self):
        return (CropStore, (self.path,))

    @property
    def array(self) -> zarr.Array:
        return zarr.open_group(self.path, mode="r", use_consolidated=False)["crops"]

    def table(self) -> pd.DataFrame:
        from anndata.io import read_elem

        g = zarr.open_group(self.path, mode="r", use_consolidated=False)
        df = read_elem(g["obs"]).reset_index(drop=True)
        df.insert(0, "store_index", np.arange(len(df)))
        return df

    def read(self, rows: np.ndarray, channels: Sequence[int]) -> np.ndarray:
        """Crops of the given store rows (sorted ascending), selected channels."""
        if len(rows) == 0:
            return np.zeros((0, len(channels), self.crop_size, self.crop_size), self.meta["dtype"])
        rows = np.asarray(rows)
        if np.all(np.diff(rows) == 1):  # a contiguous block (the engine's case): one slice
            idx = (slice(int(rows[0]), int(rows[-1]) + 1), list(channels), slice(None), slice(None))
        else:  # scattered rows (attention's random cells): only their chunks
            idx = (rows, list(channels), slice(None), slice(None))
        block = read_array(self.array, self.path, idx)
        if np.issubdtype(block.dtype, np.floating) and not np.isfinite(block).all():
            k = int(np.flatnonzero(~np.isfinite(block.reshape(len(block), -1)).all(axis=1))[0])
            names = [self.meta["channels"][c] for c in channels] if self.meta.get("channels") else None
            check_finite(block[k], f"{self.path}: crop {int(rows[k])}", names or [str(c) for c in channels])
        return block.astype(block.dtype.newbyteorder("="), copy=False)
