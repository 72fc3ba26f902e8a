"""What every cell source is (:class:`CellSource`) and the parts of sources that more than one kind shares.

Only :mod:`scdino.cells` knows kinds of sources. Each kind registers itself where it is defined (:func:`register`, a
class decorator); :mod:`scdino.cells.source` imports every module of the package (and the ``scdino.sources`` entry
points of other packages) and opens the kind that claims a path. A new kind of source is one new module here.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, ClassVar, Protocol

import numpy as np
import pandas as pd

from scdino.errors import ConfigError, InputError

#: what a source's cells may have, as commands ask: ``wells`` (cells of plate wells and fields: per-well profiles and
#: figures), ``label_images`` (``--labels`` names a label image stored with each field), ``object_tables``
#: (``--labels`` names a CellProfiler object table of cell centres), ``classes`` (a class label per cell: evaluate)
CAPABILITIES = ("wells", "label_images", "object_tables", "classes")


class CellSource(Protocol):
    #: the registry's name of this kind of source (recorded in a run's ``uns``)
    kind: ClassVar[str]
    #: what a reader is told this kind of source is, when a path is claimed by none
    accepts: ClassVar[str]
    #: the :class:`CellOptions` fields that do not apply to this kind of source
    ignores: ClassVar[tuple[str, ...]]
    #: asked last whether it claims a path, as it claims every path of some broad kind (a plate: any folder)
    catch_all: ClassVar[bool]
    #: what this source's cells have (names from :data:`CAPABILITIES`), set per source: one crop store has classes,
    #: another not
    capabilities: tuple[str, ...]
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
    #: the columns that name what one read decodes whole (a plate's field), so that a pipeline sends the reads of one
    #: such unit to one process, which keeps it decoded; () where reads decode nothing whole
    read_unit: tuple[str, ...]

    #: the units cells are found in, in table order (picklable)
    parts: list[Any]

    def identity(self) -> dict[str, Any]: ...

    def cells_of(self, part: Any) -> pd.DataFrame: ...

    def find_cells(self, client: Any = None, progress: Callable[[int], Any] | None = None) -> pd.DataFrame: ...

    # optional: def cells_and_crops(self, part, alloc=np.empty) -> tuple[pd.DataFrame, np.ndarray]: the cells of a part
    # and their crops in table order, from one decode of the part (sources found part by part have it: FoundByParts)

    def combine(self, parts: list[pd.DataFrame | None]) -> pd.DataFrame:
        """The cell table from the tables of :attr:`parts` (in order; None or empty for a part without cells); an
        error naming the source when no part has a cell."""
        ...

    def read(self, rows: pd.DataFrame) -> np.ndarray: ...

    @classmethod
    def claims(cls, path: str) -> bool: ...

    @staticmethod
    def cell_ids(table: pd.DataFrame) -> pd.Index:
        """The name of each cell of ``table`` (a cell table of this kind of source, or the ``obs`` of a run of it):
        unique, what ``obs`` is indexed by and what ``--cells`` takes."""
        ...

    @staticmethod
    def title(row: pd.Series) -> str:
        """A cell as a reader is shown it (a figure's panel title), from its row of the cell table."""
        ...

    def describe(self) -> dict[str, Any]: ...


#: the registered kinds of source, in the order they were registered (:func:`kinds` puts catch-alls last)
SOURCES: list[type] = []


def register(kind: type) -> type:
    """Add a kind of source to the registry (a class decorator in the module that defines it). A kind is a class with
    the attributes and methods of :class:`CellSource`, made as ``kind(path, opts)``; a ``catch_all`` kind is asked
    after every other."""
    if any(k.kind == kind.kind for k in SOURCES):
        raise ConfigError(f"a cell source of kind {kind.kind!r} is registered already")
    SOURCES.append(kind)
    return kind


def unregister(kind: type) -> None:
    """Remove a kind of source (a source registered for a while, as a test registers one)."""
    SOURCES.remove(kind)


def kinds() -> list[type]:
    """The registered kinds in the order they are asked whether they claim a path: catch-alls last."""
    return sorted(SOURCES, key=lambda k: bool(getattr(k, "catch_all", False)))


def field_title(row: pd.Series) -> str:
    """A cell found in a field, as a reader names it: ``well B/3, field 0`` and ``cell 17``."""
    return f"well {row['well']}, field {row['field']}\ncell {row['label']}"


def file_title(name: str, width: int = 24) -> str:
    """A cell named by its file: the file's name, its middle cut out where it is longer than ``width``."""
    name = Path(str(name)).name
    return name if len(name) <= width else name[:10] + "..." + name[-(width - 13) :]


def describe(source: CellSource) -> dict[str, Any]:
    """What a run records of its source in ``uns``: kind, capabilities and path."""
    return {"kind": source.kind, "capabilities": list(source.capabilities), "path": os.path.abspath(source.path)}


def field_cell_names(table: pd.DataFrame) -> pd.Index:
    """The name of each cell found in fields: ``well/field/label``. Each (well, field) prefix is made once and each
    name in one step (summing the columns made three strings a cell on the way: 1M names peaked at 185 MB and took
    2.5 times as long)."""
    wells, well_names = pd.factorize(table["well"].astype(str))
    fields, field_names = pd.factorize(table["field"].astype(str))
    k = max(1, len(field_names))
    pairs, at = np.unique(wells.astype(np.int64) * k + fields, return_inverse=True)
    prefixes = [f"{well_names[p // k]}/{field_names[p % k]}/" for p in pairs]
    labels = table["label"].tolist()
    return pd.Index([prefixes[c] + str(lab) for c, lab in zip(at.tolist(), labels)], dtype=object)


def find_parts(
    source: CellSource, client: Any = None, progress: Callable[[int], Any] | None = None
) -> list[pd.DataFrame]:
    """The cell tables of every part of ``source``, in order: on ``client`` (a Dask client) if given, else on a
    local thread pool."""
    n = len(source.parts)
    parts: list[pd.DataFrame | None] = [None] * n
    if client is not None:
        from distributed import as_completed

        futs = client.map(source.cells_of, source.parts, pure=False)
        index = {f.key: i for i, f in enumerate(futs)}
        for fut, df in as_completed(futs, with_results=True):
            parts[index[fut.key]] = df
            if progress:
                progress(1)
    else:
        with ThreadPoolExecutor(max_workers=max(1, min(n, os.cpu_count() or 1))) as pool:
            for i, df in enumerate(pool.map(source.cells_of, source.parts)):
                parts[i] = df
                if progress:
                    progress(1)
    return [p for p in parts if p is not None and len(p)]


def no_cells_message(path: str, n: int, labels: str | None, fix: str) -> str:
    """What to say when no field of a source holds a cell."""
    how = f"labels {labels!r}" if labels else "the built-in segmentation"
    return (
        f"{path}: no nuclei found in {n} fields with {how}; check --segment-channel and the segmentation parameters, "
        f"{fix}"
    )


class FoundByParts:
    """The cell table of a source whose cells are found part by part (a plate's fields, a CSV's image sets): the
    parts' tables in order; a source says in :meth:`no_cells` what to tell the user when no part has a cell."""

    def no_cells(self) -> str:  # what to say when no part has a cell
        raise NotImplementedError

    # the cells of plate wells and fields (a plate's fields, a CSV's image sets), named and titled alike
    @staticmethod
    def cell_ids(table: pd.DataFrame) -> pd.Index:
        return field_cell_names(table)

    @staticmethod
    def title(row: pd.Series) -> str:
        return field_title(row)

    def describe(self) -> dict[str, Any]:
        return describe(self)

    def find_cells(self, client: Any = None, progress: Callable[[int], Any] | None = None) -> pd.DataFrame:
        """The cell table of every part, in order; on ``client`` (a Dask client) if given."""
        return self.combine(find_parts(self, client, progress))

    def cells_and_crops(self, part: Any, alloc: Callable = np.empty) -> tuple[pd.DataFrame, np.ndarray]:
        """The cells of ``part`` and their raw crops (n, C, S, S) in table order. Here: found, then read; a source
        that can cut as it finds (one decode of the part) does better. ``alloc(shape, dtype)`` makes the crops array
        where a source cuts into one."""
        table = self.cells_of(part)
        return table, self.read(table)

    def combine(self, parts: list[pd.DataFrame | None]) -> pd.DataFrame:
        """The cell table from the tables of the source's parts, in order; an error when no part has a cell."""
        frames = [p for p in parts if p is not None and len(p)]
        if not frames:
            raise InputError(self.no_cells())
        return pd.concat(frames, ignore_index=True)
