"""Cell sources: one protocol for every place cells come from, so that no command asks which kind it was given.

An OME-Zarr plate (:class:`PlateSource`: cells found by stored labels or segmentation, crops cut around them) and a crop
store (:class:`CropStoreSource`: crops already cut) both give

* the selected channels (indices, names, and every channel the source has), the crop size and the pixel dtype;
* :attr:`~CellSource.parts` and :meth:`~CellSource.cells_of`: the units cells are found in (a plate's fields; a crop
  store is one part) and the cells of one part (picklable, so a pipeline can find the cells of a part as a task and
  start embedding them while the next parts are still searched);
* :meth:`~CellSource.find_cells`: the whole cell table, the parts' tables in order (searched in parallel, on a Dask
  client when one is given, else on a local thread pool);
* :meth:`~CellSource.read`: raw crops (n, C, S, S) for any rows of that table (picklable, so Dask tasks can call it);
* :meth:`~CellSource.identity`: what a resumed run must find unchanged.
"""

from __future__ import annotations

import logging
import os
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Protocol

import numpy as np
import pandas as pd

from scdino.cells.cropstore import CropStore, is_crop_store
from scdino.cells.options import CellOptions
from scdino.cells.plate import FieldRef, Plate, missing_labels_message, resolve_channels
from scdino.cells.table import FieldPlan, empty_table, field_cells, plan_field, read_crops
from scdino.errors import ConfigError, InputError

log = logging.getLogger(__name__)


class CellSource(Protocol):
    path: str
    #: indices of the selected channels in the source, in model input order
    channels: tuple[int, ...]
    channel_names: tuple[str, ...]
    #: every channel the source has
    available_channels: tuple[str, ...]
    crop_size: int
    dtype: np.dtype
    #: the table columns :meth:`read` needs
    read_columns: tuple[str, ...]

    #: the units cells are found in, in table order (picklable)
    parts: list[Any]

    def identity(self) -> dict[str, Any]: ...

    def cells_of(self, part: Any) -> pd.DataFrame: ...

    def find_cells(self, client: Any = None, progress: Callable[[int], Any] | None = None) -> pd.DataFrame: ...

    def combine(self, parts: list[pd.DataFrame]) -> pd.DataFrame: ...

    def read(self, rows: pd.DataFrame) -> np.ndarray: ...


def open_source(path: str | os.PathLike, opts: CellOptions = CellOptions()) -> CellSource:
    """The cell source at ``path``: a crop store (``scdino-engine ingest``) or an OME-Zarr HCS plate."""
    path = str(path)
    return CropStoreSource(path, opts) if is_crop_store(path) else PlateSource(path, opts)


class PlateSource:
    """Cells of an OME-Zarr HCS plate, found per field with ``opts`` (picklable: it holds paths and options)."""

    read_columns = ("well", "field", "crop_y0", "crop_x0")

    def __init__(self, path: str, opts: CellOptions = CellOptions()) -> None:
        self.path = path
        self.opts = opts
        self.plate = plate = Plate(path)
        self.fields: list[FieldRef] = plate.fields(opts.wells)
        if not self.fields:
            raise InputError(f"{path}: the plate lists no fields in the selected wells")
        plans = [plan_field(plate, f, opts) for f in self.fields]
        if opts.labels:  # checked here, before any cluster starts, not in the tasks that read them
            for f in self.fields:
                have = plate.label_names(f)
                if opts.labels not in have:
                    raise InputError(missing_labels_message(f"{plate.path}/{f.path}", opts.labels, have))
        for f in self.fields:  # never silent zeros: say where chunks are missing, before any work starts
            missing = plate.missing_chunks(f)
            if missing:
                log.warning(missing)
        first: FieldPlan = plans[0]
        for p in plans[1:]:
            if p.channel_names != first.channel_names or p.crop != first.crop:
                raise InputError(
                    f"{plate.path}/{p.ref.path}: channels {p.channel_names} and crop {p.crop} px differ from "
                    f"{first.ref.path} ({first.channel_names}, {first.crop} px); pass --channels / --crop-size so "
                    "that every field gives the same input"
                )
        dtypes = {plate.image(p.ref).array.dtype.newbyteorder("=") for p in plans}
        if len(dtypes) > 1:
            raise InputError(
                f"{plate.path}: fields of different pixel types ({', '.join(map(str, dtypes))}); "
                "convert the plate to one dtype"
            )
        self.dtype = dtypes.pop()  # native byte order: big-endian stores are converted on read
        self.channels = first.channels
        self.channel_names = first.channel_names
        self.available_channels = tuple(plate.channel_names(first.ref))
        self.crop_size = first.crop
        self.token = uuid.uuid4().hex  # names this reader's decoded fields in each process's cache

    @property
    def parts(self) -> list[FieldRef]:
        return self.fields

    def cells_of(self, part: FieldRef) -> pd.DataFrame:
        return field_cells(self.plate, part, self.opts)

    def identity(self) -> dict[str, Any]:
        return {
            "plate": os.path.abspath(self.path),
            "plate_name": self.plate.name,
            "n_fields": len(self.fields),
            "cells": self.opts.to_dict(),
            "channels": list(self.channel_names),
            "crop": self.crop_size,
        }

    def find_cells(self, client: Any = None, progress: Callable[[int], Any] | None = None) -> pd.DataFrame:
        """The cell table of every field, in plate order; on ``client`` (a Dask client) if given."""
        n = len(self.fields)
        parts: list[pd.DataFrame | None] = [None] * n
        if client is not None:
            from distributed import as_completed

            futs = client.map(self.cells_of, self.fields, pure=False)
            index = {f.key: i for i, f in enumerate(futs)}
            for fut, df in as_completed(futs, with_results=True):
                parts[index[fut.key]] = df
                if progress:
                    progress(1)
        else:
            with ThreadPoolExecutor(max_workers=max(1, min(n, os.cpu_count() or 1))) as pool:
                for i, df in enumerate(pool.map(self.cells_of, self.fields)):
                    parts[i] = df
                    if progress:
                        progress(1)
        return self.combine(parts)

    def combine(self, parts: list[pd.DataFrame | None]) -> pd.DataFrame:
        """The cell table from the tables of :attr:`parts`, in order; an error when no part has a cell."""
        frames = [p for p in parts if p is not None and len(p)]
        table = pd.concat(frames, ignore_index=True) if frames else empty_table()
        if table.empty:
            how = f"labels {self.opts.labels!r}" if self.opts.labels else "the built-in segmentation"
            raise InputError(
                f"{self.path}: no nuclei found in {len(parts)} fields with {how}; check --segment-channel and "
                "the segmentation parameters, or pass --labels with a label image of the plate"
            )
        return table

    @property
    def n_fields(self) -> int:
        return len(self.fields)

    def read(self, rows: pd.DataFrame) -> np.ndarray:
        return read_crops(
            self.plate, rows.reset_index(drop=True), self.channels, self.crop_size, self.dtype, cache_token=self.token
        )


class CropStoreSource:
    """Cells of a crop store: the table is the store's rows, crops are read as stored."""

    read_columns = ("store_index",)
    n_fields = 0

    def __init__(self, path: str, opts: CellOptions = CellOptions()) -> None:
        self.path = path
        self.opts = opts
        self.store = store = CropStore(path)
        if opts.crop_size not in (None, store.crop_size) or opts.crop_um is not None:
            raise ConfigError(f"{path}: a crop store holds {store.crop_size} px crops; drop --crop-size/--crop-um")
        ignored = opts.plate_options()
        if ignored:
            raise ConfigError(f"{path}: a crop store holds cut cells; {', '.join(ignored)} do not apply to it")
        idx = resolve_channels(store.channels, opts.channels, path)
        self.channels = tuple(idx)
        self.channel_names = tuple(store.channels[c] for c in idx)
        self.available_channels = tuple(store.channels)
        self.crop_size = store.crop_size
        self.dtype = np.dtype(store.meta["dtype"]).newbyteorder("=")

    def identity(self) -> dict[str, Any]:
        return {
            "plate": os.path.abspath(self.path),
            "n_fields": 0,
            "cells": self.opts.to_dict(),
            "channels": list(self.channel_names),
            "crop": self.crop_size,
            "source": dict(self.store.meta),
        }

    parts = [None]  # one part: the store's table

    def cells_of(self, part: Any = None) -> pd.DataFrame:
        return self.store.table()

    def find_cells(self, client: Any = None, progress: Callable[[int], Any] | None = None) -> pd.DataFrame:
        return self.store.table()

    def combine(self, parts: list[pd.DataFrame]) -> pd.DataFrame:
        return parts[0]

    def read(self, rows: pd.DataFrame) -> np.ndarray:
        return self.store.read(rows["store_index"].to_numpy(), self.channels)


def read_all(source: CellSource, table: pd.DataFrame, block: int = 4096) -> np.ndarray:
    """Every crop of ``table`` in memory (training, evaluation baselines), read ``block`` rows at a time."""
    parts = [source.read(table.iloc[a : a + block]) for a in range(0, len(table), block)]
    if not parts:
        return np.zeros((0, len(source.channels), source.crop_size, source.crop_size), source.dtype)
    return np.concatenate(parts)
