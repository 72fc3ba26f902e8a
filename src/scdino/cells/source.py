"""Cell sources: one protocol for every place cells come from, so that no command asks which kind it was given.

An OME-Zarr plate (:class:`PlateSource`: cells found by stored labels or segmentation, crops cut around them), a crop
store (:class:`CropStoreSource`: crops already cut) and a CellProfiler LoadData CSV
(:class:`~scdino.cells.loaddata.LoadDataSource`: one TIFF per channel per site) all give

* the selected channels (indices, names, and every channel the source has), the crop size and the pixel dtype;
* :attr:`~CellSource.parts` and :meth:`~CellSource.cells_of`: the units cells are found in (a plate's fields; a crop
  store is one part) and the cells of one part (picklable, so a pipeline can find the cells of a part as a task and
  start embedding them while the next parts are still searched);
* :meth:`~CellSource.find_cells`: the whole cell table, the parts' tables in order (searched in parallel, on a Dask
  client when one is given, else on a local thread pool);
* :meth:`~CellSource.read`: raw crops (n, C, S, S) for any rows of that table (picklable, so Dask tasks can call it);
* :meth:`~CellSource.identity`: what a resumed run must find unchanged;
* :attr:`~CellSource.kind` and :attr:`~CellSource.capabilities` (:data:`CAPABILITIES`), recorded by a run
  (:meth:`~CellSource.describe`) so that later commands read what its cells have instead of guessing from columns;
* :meth:`~CellSource.cell_ids` and :meth:`~CellSource.title`: the name of each cell (in an embeddings store, and as
  ``--cells`` takes it) and how a figure titles it, so that no command looks for a kind's columns.

Each kind registers itself in its own module (:func:`~scdino.cells.base.register`); :func:`open_source` asks each, in
order (catch-alls last), whether it claims a path. Every module of :mod:`scdino.cells` is imported before the first
question, and so are the kinds other packages declare under the ``scdino.sources`` entry point group.
"""

from __future__ import annotations

import importlib
import logging
import os
import pkgutil
import uuid
from dataclasses import replace
from importlib.metadata import entry_points
from typing import Any, Callable

import numpy as np
import pandas as pd

import scdino.cells
from scdino.cells.base import (
    CellSource,
    FoundByParts,
    describe,
    file_title,
    kinds,
    no_cells_message,
    register,
)
from scdino.cells.cropstore import CropStore, is_crop_store
from scdino.cells.options import CellOptions
from scdino.cells.plate import FieldRef, Plate, missing_labels_message, resolve_channels
from scdino.cells.table import FieldPlan, field_cells, field_cells_and_crops, plan_field, read_crops
from scdino.errors import ConfigError, InputError

log = logging.getLogger(__name__)


@register
class CropStoreSource:
    """Cells of a crop store: the table is the store's rows, crops are read as stored."""

    kind = "crop_store"
    accepts = "a crop store (a folder made by 'scdino-engine ingest')"
    ignores = ("crop_size", "crop_um", "wells", "labels", "segment_channel")
    catch_all = False
    read_columns = ("store_index",)
    read_unit: tuple[str, ...] = ()

    def __init__(self, path: str, opts: CellOptions = CellOptions()) -> None:
        self.path = path
        self.opts = opts
        self.store = store = CropStore(path)
        if opts.crop_size not in (None, store.crop_size) or opts.crop_um is not None:
            raise ConfigError(f"{path}: a crop store holds {store.crop_size} px crops; drop --crop-size/--crop-um")
        ignored = opts.given(tuple(n for n in self.ignores if n not in ("crop_size", "crop_um")))  # checked above
        if ignored:
            raise ConfigError(f"{path}: a crop store holds cut cells; {', '.join(ignored)} do not apply to it")
        idx = resolve_channels(store.channels, opts.channels, path)
        self.channels = tuple(idx)
        self.channel_names = tuple(store.channels[c] for c in idx)
        self.available_channels = tuple(store.channels)
        self.crop_size = store.crop_size
        self.dtype = np.dtype(store.meta["dtype"]).newbyteorder("=")
        self.capabilities = ("classes",) if store.meta.get("classes") else ()

    @classmethod
    def claims(cls, path: str) -> bool:
        return is_crop_store(path)

    @staticmethod
    def cell_ids(table: pd.DataFrame) -> pd.Index:
        """A crop store's cell is its source file."""
        return pd.Index(table["path"].astype(str))

    @staticmethod
    def title(row: pd.Series) -> str:
        return file_title(row["path"])

    def describe(self) -> dict[str, Any]:
        return describe(self)

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
        table = self.store.table()
        if progress:
            progress(1)
        return table

    def combine(self, parts: list[pd.DataFrame]) -> pd.DataFrame:
        return parts[0]

    def read(self, rows: pd.DataFrame) -> np.ndarray:
        return self.store.read(rows["store_index"].to_numpy(), self.channels)


@register
class PlateSource(FoundByParts):
    """Cells of an OME-Zarr HCS plate, found per field with ``opts`` (picklable: it holds paths and options)."""

    kind = "plate"
    accepts = "an OME-Zarr HCS plate (a folder with plate metadata)"
    ignores: tuple[str, ...] = ()
    #: it claims every folder (its reader says what is wrong with one that is no plate)
    catch_all = True
    read_columns = ("well", "field", "crop_y0", "crop_x0")
    read_unit = ("well", "field")

    def __init__(self, path: str, opts: CellOptions = CellOptions()) -> None:
        self.path = path
        self.opts = opts
        self.capabilities = ("wells", "label_images")
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

    def cells_and_crops(self, part: FieldRef, alloc: Callable = np.empty) -> tuple[pd.DataFrame, np.ndarray]:
        """The cells of a field and their crops, from one decode of the field."""
        return field_cells_and_crops(self.plate, part, self.opts, self.dtype, alloc)

    def identity(self) -> dict[str, Any]:
        return {
            "plate": os.path.abspath(self.path),
            "plate_name": self.plate.name,
            "n_fields": len(self.fields),
            "cells": self.opts.to_dict(),
            "channels": list(self.channel_names),
            "crop": self.crop_size,
        }

    def no_cells(self) -> str:
        return no_cells_message(
            self.path, len(self.fields), self.opts.labels, "or pass --labels with a label image of the plate"
        )

    @classmethod
    def claims(cls, path: str) -> bool:
        """Any path that is not a file (a folder, or a store URL): the plate reader says what is wrong with it."""
        return not os.path.isfile(path)

    @property
    def n_fields(self) -> int:
        return len(self.fields)

    def read(self, rows: pd.DataFrame) -> np.ndarray:
        return read_crops(
            self.plate, rows.reset_index(drop=True), self.channels, self.crop_size, self.dtype, cache_token=self.token
        )


_LOADED: list[bool] = []


def registered() -> list[type]:
    """Every registered kind of source, in the order they are asked (:func:`scdino.cells.base.kinds`), after importing
    every module of :mod:`scdino.cells` (each registers the kinds it defines) and the ``scdino.sources`` entry points
    once."""
    if not _LOADED:
        _LOADED.append(True)
        for mod in pkgutil.iter_modules(scdino.cells.__path__):
            importlib.import_module(f"scdino.cells.{mod.name}")
        for ep in entry_points(group="scdino.sources"):
            ep.load()
    return kinds()


def source_type(path: str | os.PathLike) -> type:
    """The registered kind of source that claims ``path``; a clear error listing what is accepted when none does."""
    path = str(path)
    for kind in registered():
        if kind.claims(path):
            return kind
    accepted = "; ".join(k.accepts for k in registered())
    raise InputError(f"{path}: not a cell source scdino reads; expected {accepted}")


def source_kind(name: str) -> type:
    """The registered kind of source named ``name`` (as a run's ``uns`` records it)."""
    for kind in registered():
        if kind.kind == name:
            return kind
    names = ", ".join(k.kind for k in registered())
    raise InputError(f"cell source kind {name!r} is not known here; kinds are {names}")


def open_source(path: str | os.PathLike, opts: CellOptions = CellOptions()) -> CellSource:
    """The cell source at ``path``, of the first registered kind that claims it (:func:`registered`)."""
    return source_type(path)(str(path), opts)


def usable_options(path: str | os.PathLike, opts: CellOptions) -> tuple[CellOptions, list[str]]:
    """``opts`` without the options that do not apply to the source at ``path`` (a configuration written for another
    kind of source), and the names of those dropped."""
    kind = source_type(path)
    dropped = [name for name in kind.ignores if getattr(opts, name) is not None]
    return replace(opts, **{name: None for name in dropped}), dropped


def read_all(source: CellSource, table: pd.DataFrame, block: int = 4096) -> np.ndarray:
    """Every crop of ``table`` in memory (training, evaluation baselines), read ``block`` rows at a time."""
    parts = [source.read(table.iloc[a : a + block]) for a in range(0, len(table), block)]
    if not parts:
        return np.zeros((0, len(source.channels), source.crop_size, source.crop_size), source.dtype)
    return np.concatenate(parts)
