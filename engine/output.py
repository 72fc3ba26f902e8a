"""The embeddings store: AnnData on zarr, written block by block, resumable, marked complete only at the end.

Layout (readable by ``anndata.read_zarr``): ``obs`` = cell table, ``obsm/X_scdino`` = float32 CLS tokens chunked
along cells exactly like the engine's blocks (so each block is one atomic chunk write), ``uns/scdino`` = run
metadata, ``uns/scdino_progress`` = one flag per block. The root attribute ``scdino.status`` is ``creating``,
``running`` or ``complete``. When the run completes, ``X`` gets a copy of the embeddings and ``var`` names their
dimensions (``scdino_0000``, ...), so that scanpy's defaults (``pp.pca``, ``pp.neighbors``, ``tl.leiden``,
``tl.rank_genes_groups``) run on the store as read; the copy doubles the embeddings' bytes on disk (docs/engine.md).
"""

from __future__ import annotations

import logging
import os
import warnings
from contextlib import contextmanager
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
import zarr

from scdino.cells.source import open_source, source_kind
from scdino.errors import InputError, OutputError, ScdinoError
from scdino.outputs import claim_dir, mark, recognise_zarr, written_by

log = logging.getLogger(__name__)

KEY = "X_scdino"
COMMAND = "scdino-engine run"
recognise_zarr("scdino", COMMAND)  # the root attribute of every store this module writes


def store_status(path: str) -> dict[str, Any] | None:
    """The ``scdino`` root attribute of an existing store, ``{}`` for a foreign zarr store, None if absent."""
    if not os.path.exists(path):
        return None
    try:
        g = zarr.open_group(path, mode="r", use_consolidated=False)
    except Exception:  # not a zarr group at all
        return {}
    return dict(g.attrs.get("scdino", {}))


def cell_obs(path: str, table: pd.DataFrame, uns: dict) -> pd.DataFrame:
    """``obs`` of a store: the cell table with categorical plate/well/field and one name per cell as its index (by
    the rule of the source ``uns`` records: :func:`cell_names`)."""
    obs = table.copy(deep=False)  # the numeric columns are shared, not copied: a 1M-cell table is 100 MB a copy
    for col in ("plate", "well", "field"):
        if col in obs:
            obs[col] = obs[col].astype(str).astype("category")
    obs.index = cell_names(table, uns).values
    if obs.index.has_duplicates:
        dup = obs.index[obs.index.duplicated()][0]
        raise OutputError(f"{path}: cell {dup} appears twice in the cell table; this is a bug, please report it")
    return obs


#: the root's ``encoding-type`` while a run writes the store: what anndata's reader says of a store it cannot read yet
UNFINISHED = (
    "unfinished scdino-engine run (the store is AnnData once complete; run the same command again to resume it, "
    "or read it with scdino.open for a clear message)"
)


def finished_status(path: str) -> dict[str, Any]:
    """The ``scdino`` attribute of the store at ``path`` (``{}`` for a foreign zarr store), refused in one line where
    there is no store or its run is unfinished (how many blocks are embedded, and how to resume it): what every reader
    of a store asks first."""
    st = store_status(path)
    if st is None:
        raise InputError(f"{path}: no such embeddings store; make one with 'scdino-engine run'")
    if st and st.get("status") not in (None, "complete"):
        try:
            store = EmbeddingStore(path)
            done = f"{int(store.done().sum())} of {store.n_blocks} blocks embedded"
        except Exception:  # stopped while its store was being made
            done = "stopped while its store was being made"
        raise InputError(
            f"{path}: an unfinished scdino-engine run ({done}); run the same command again to finish it (it resumes "
            "where it stopped), then read it"
        )
    return st


def open_cells(path: str):
    """The embeddings store at ``path`` as AnnData (``anndata.read_zarr``), once it is complete; an unfinished run
    is one clear error saying how many blocks are written and how to resume it."""
    import anndata as ad

    finished_status(path)
    return ad.read_zarr(path)


class EmbeddingStore:
    def __init__(self, path: str) -> None:
        self.path = path
        self.group = zarr.open_group(path, mode="r+", use_consolidated=False)
        meta = dict(self.group.attrs["scdino"])
        self.chunk = int(meta["chunk"])
        self.n = int(meta["n_cells"])
        self.X = self.group["obsm"][KEY]
        self.progress = self.group["uns"]["scdino_progress"]

    @property
    def n_blocks(self) -> int:
        return -(-self.n // self.chunk) if self.n else 0

    @property
    def has_table(self) -> bool:
        """Whether the cell table is written (a run that streams cells writes it once every cell is found)."""
        return bool(dict(self.group.attrs["scdino"]).get("table", True))

    @classmethod
    def create(
        cls, path: str, table: pd.DataFrame | None, embed_dim: int, chunk: int, uns: dict, fingerprint: str
    ) -> "EmbeddingStore":
        """A new store for ``table``; with ``table=None`` an empty one that :meth:`grow` extends as cells are found and
        :meth:`write_table` completes (until then ``has_table`` is false: a resumed run finds the cells again)."""
        import anndata as ad

        claim_dir(path, COMMAND, overwrite=True)  # only a store scdino wrote is ever replaced
        obs = cell_obs(path, table, uns) if table is not None else pd.DataFrame(index=pd.Index([], dtype=str))
        write_small(path, ad.AnnData(obs=obs, uns={"scdino": uns}))
        mark(path, COMMAND)
        g = zarr.open_group(path, mode="r+", use_consolidated=False)
        # not AnnData until complete: anndata.read_zarr on a store still being written fails with this sentence
        g.attrs.update({"scdino": {"status": "creating"}, "encoding-type": UNFINISHED})
        n = len(obs)
        x = g["obsm"].create_array(
            KEY, shape=(n, embed_dim), chunks=(chunk, embed_dim), dtype="float32", fill_value=np.nan
        )
        x.attrs.update({"encoding-type": "array", "encoding-version": "0.2.0"})
        nb = -(-n // chunk)
        p = g["uns"].create_array("scdino_progress", shape=(nb,), chunks=(1,), dtype="uint8", fill_value=0)
        p.attrs.update({"encoding-type": "array", "encoding-version": "0.2.0"})
        meta = {"status": "running", "fingerprint": fingerprint, "chunk": chunk, "n_cells": n}
        g.attrs["scdino"] = meta if table is not None else {**meta, "table": False}
        consolidate(path)  # anndata.read_zarr reads consolidated metadata
        return cls(path)

    def grow(self, n: int) -> None:
        """Room for ``n`` cells (never fewer than it has): the embeddings and the block flags are resized."""
        if n > self.n:
            self.resize(n)

    def resize(self, n: int) -> None:
        """Room for exactly ``n`` cells: the embeddings and the block flags are resized (room a stream grew ahead of
        the cells it found goes; no block is written there)."""
        if n < self.n and self.done()[-(-n // self.chunk) :].any():
            raise OutputError(f"{self.path}: blocks past cell {n} are written; the store is not this run's")
        self.X.resize((n, self.X.shape[1]))
        self.progress.resize((-(-n // self.chunk),))
        self.n = n
        self.group.attrs["scdino"] = {**dict(self.group.attrs["scdino"]), "n_cells": n}

    def write_table(self, table: pd.DataFrame, counts: dict[str, np.ndarray] | None = None) -> None:
        """The finished cell table as ``obs`` (one row per cell of the store, in order), and ``counts`` (cells found
        and embedded per field, :func:`field_counts`) as ``uns["scdino"]["fields"]``."""
        from anndata.io import write_elem

        if len(table) != self.n:
            raise OutputError(f"{self.path}: a cell table of {len(table)} rows for a store of {self.n} cells")
        with quiet_zarr():
            write_elem(self.group, "obs", cell_obs(self.path, table, {"source": run_source(self.path)}))
            if counts is not None:
                write_elem(self.group["uns"]["scdino"], "fields", counts)
        self.group.attrs["scdino"] = {**dict(self.group.attrs["scdino"]), "table": True}
        consolidate(self.path)

    @classmethod
    def resume(cls, path: str, fingerprint: str) -> "EmbeddingStore":
        meta = store_status(path) or {}
        if meta.get("fingerprint") != fingerprint:
            raise OutputError(
                f"{path}: holds an unfinished run with other settings (model, channels, cells or preprocessing), or "
                "one started by another scdino version; pass --overwrite to start again, or --out with a new path"
            )
        return cls(path)

    def table(self) -> pd.DataFrame:
        from anndata.io import read_elem

        return read_elem(self.group["obs"]).reset_index(drop=True)

    def done(self) -> np.ndarray:
        return self.progress[...].astype(bool)

    def block_range(self, i: int) -> tuple[int, int]:
        return i * self.chunk, min(self.n, (i + 1) * self.chunk)

    def write_block(self, i: int, emb: np.ndarray) -> None:
        self.write_blocks(i, emb)

    def write_blocks(self, i: int, emb: np.ndarray) -> None:
        """Blocks ``i``, ``i + 1``, ... (as many as ``emb`` covers) in one write: each block is one whole chunk, so
        each is written atomically, and the blocks' flags are set together once all of them are on disk (one zarr call
        each instead of two per block: the writes of a 256-cell block were mostly call overhead)."""
        a = self.block_range(i)[0]
        j = i + max(1, -(-len(emb) // self.chunk))
        b = self.block_range(j - 1)[1]
        if emb.shape != (b - a, self.X.shape[1]):
            raise OutputError(
                f"{self.path}: blocks {i}-{j - 1} have shape {emb.shape}, expected {(b - a, self.X.shape[1])}"
            )
        if not np.isfinite(emb).all():
            raise OutputError(f"{self.path}: block {i} (cells {a}-{b}) has non-finite embeddings; the model diverged")
        self.X[a:b] = emb  # whole chunks: each an atomic write
        self.progress[i:j] = 1  # only after the data are on disk

    def finish(self, updates: dict) -> None:
        """Mark the store complete, replacing the entries ``updates`` names in ``uns/scdino`` (the rest of it was
        written when the store was made; rewriting all of it costs a zarr array per entry, about 0.5 s)."""
        from anndata.io import write_elem

        if not self.has_table:
            raise OutputError(f"{self.path}: its cell table is not written; cannot mark complete")
        if not self.done().all():
            raise OutputError(f"{self.path}: {int((~self.done()).sum())} blocks missing; cannot mark complete")
        self._write_x()
        with quiet_zarr():
            for key, value in updates.items():
                write_elem(self.group["uns"]["scdino"], key, value)
        consolidate(self.path)  # everything but the status: a failure up to here leaves a run that a rerun finishes
        # the status last, in one atomic write of the root's metadata that keeps the consolidated metadata just
        # written: a store is marked complete only whole, and nothing is written into it after that
        root = zarr.open_group(self.path, mode="r+", use_consolidated=True)
        root.attrs.update({"scdino": {**dict(root.attrs["scdino"]), "status": "complete"}, "encoding-type": "anndata"})
        self.group = root

    def _write_x(self, rows: int = 65536) -> None:
        """``X`` = the finished embeddings, copied from ``obsm/X_scdino`` ``rows`` at a time, and ``var`` naming their
        dimensions. Written last, from what the blocks wrote: a store begun before ``X`` existed resumes into the same
        layout, and a run stopped here writes it again when resumed (the store is not complete until then)."""
        from anndata.io import write_elem

        n, dim = self.X.shape
        if "X" in self.group:
            del self.group["X"]
        x = self.group.create_array("X", shape=(n, dim), chunks=(self.chunk, dim), dtype="float32")
        x.attrs.update({"encoding-type": "array", "encoding-version": "0.2.0"})
        step = self.chunk * max(1, rows // self.chunk)  # whole chunks
        for a in range(0, n, step):
            x[a : a + step] = self.X[a : a + step]
        with quiet_zarr():
            write_elem(self.group, "var", pd.DataFrame(index=var_names(dim)))


def cell_names(table: pd.DataFrame, uns: dict) -> pd.Index:
    """Each cell's name in ``obs``, by the rule of the source the run records in ``uns["source"]`` (its
    :meth:`~scdino.cells.base.CellSource.cell_ids`: a crop store's cells are their files, a field's
    ``well/field/label``)."""
    kind = (uns.get("source") or {}).get("kind")
    if not kind:
        raise OutputError("the run records no cell source (uns['scdino']['source']); this is a bug, please report it")
    return source_kind(kind).cell_ids(table)


def run_source(path: str) -> dict[str, Any]:
    """What the run that wrote the store at ``path`` recorded of its cell source: ``kind`` and ``capabilities``
    (:data:`scdino.cells.base.CAPABILITIES`). A store of an older run, which recorded only the source's path, is
    described by the kind of source that path is now; ``{}`` where neither is known."""
    from anndata.io import read_elem

    g = zarr.open_group(path, mode="r", use_consolidated=False)
    if "uns" not in g or "scdino" not in g["uns"]:
        return {}
    uns = g["uns"]["scdino"]
    if "source" in uns:
        rec = read_elem(uns["source"])
        return {"kind": str(rec["kind"]), "capabilities": [str(c) for c in rec["capabilities"]], "path": rec["path"]}
    if "plate" not in uns:
        return {}
    where = str(read_elem(uns["plate"]))
    try:  # what its cells have is known of an opened source only (one crop store has classes, another not)
        source = open_source(where)
    except ScdinoError:  # moved or gone: nothing is known
        return {}
    return {"kind": source.kind, "capabilities": list(source.capabilities), "path": where}


def var_names(dim: int) -> list[str]:
    """The names of the embedding's dimensions in ``var``: ``scdino_0000``, ``scdino_0001``, ..."""
    return [f"scdino_{i:04d}" for i in range(dim)]


@contextmanager
def quiet_zarr():
    """Writes through anndata without zarr's notice about a future default (autosharding), which says nothing about
    the user's data."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*autosharding.*")
        yield


def write_small(path: str, adata) -> None:
    """Write a small AnnData (the cell table and run metadata, no matrices) as the zarr store ``path``: anndata
    writes it into memory, then its files are written in one pass. The layout is zarr's own (one file per key); only
    the way there is shorter: through zarr's local store each of the ~190 small files of a run's ``obs`` and ``uns``
    costs a round trip through its event loop, 1.3 s for the sample plate's 235 cells against 0.4 s this way
    (``python benchmarks/overhead.py``)."""
    import anndata as ad

    files: dict = {}
    with ad.settings.override(zarr_write_format=3), quiet_zarr():
        adata.write_zarr(zarr.storage.MemoryStore(store_dict=files))
    for key, buf in files.items():
        target = os.path.join(path, *key.split("/"))
        os.makedirs(os.path.dirname(target), exist_ok=True)
        with open(target, "wb") as f:
            f.write(buf.to_bytes())


def consolidate(path: str) -> None:
    """Write the consolidated metadata that ``anndata.read_zarr`` reads."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*[Cc]onsolidated metadata.*")
        warnings.filterwarnings("ignore", message=".*not recognized as a component of a Zarr hierarchy.*")  # .scdino
        zarr.consolidate_metadata(path)


def is_anndata(path: str) -> bool:
    """Whether ``path`` is a zarr store that anndata wrote (its root says so)."""
    try:
        g = zarr.open_group(path, mode="r", use_consolidated=False)
    except Exception:  # not a zarr group at all
        return False
    return g.attrs.get("encoding-type") == "anndata"


def read_embeddings(path: str, key: str = "X_scdino") -> tuple[np.ndarray, pd.DataFrame]:
    """(embeddings as float32, obs) of a complete store; clear errors for a missing or unfinished one."""
    from anndata.io import read_elem

    st = finished_status(path)
    if not st and not is_anndata(path):
        owner = written_by(path)
        what = f"it holds the output of {owner}" if owner else "it is not an AnnData store"
        raise InputError(
            f"{path}: not an embeddings store ({what}); embed its cells first (scdino-engine run {path} --out "
            "cells.zarr) and pass that store"
        )
    g = zarr.open_group(path, mode="r", use_consolidated=False)  # obs and one obsm entry, not X (a second copy)
    obsm = list(g["obsm"].keys()) if "obsm" in g else []
    if key not in obsm:
        raise InputError(f"{path}: no obsm[{key!r}] (has {', '.join(sorted(obsm)) or 'none'})")
    return np.asarray(read_elem(g["obsm"][key]), dtype=np.float32), read_elem(g["obs"])


def write_obs_column(path: str, name: str, values) -> None:
    """Add or replace the obs column ``name`` of the embeddings store at ``path`` (one value per cell, in order)."""
    from anndata.io import read_elem, write_elem

    g = zarr.open_group(path, mode="r+", use_consolidated=False)
    obs = read_elem(g["obs"])
    obs[name] = np.asarray(values) if not isinstance(values, pd.Categorical) else values
    with quiet_zarr():
        write_elem(g, "obs", obs)
    consolidate(path)


def field_counts(parts: Sequence[Mapping[str, Any]]) -> dict[str, np.ndarray] | None:
    """Cells found and embedded per field, from the ``attrs`` of each part's table (:func:`scdino.cells.table.counted`):
    one array per column (a plate of 10,000 fields is a handful of arrays, not 10,000 groups). None where the parts
    say nothing of fields (a crop store's cells are all embedded)."""
    parts = [p for p in parts if "keys" in p]
    if not parts:
        return None
    cols = list(parts[0]["keys"])
    out: dict[str, np.ndarray] = {c: np.array([str(p["keys"].get(c, "")) for p in parts]) for c in cols}
    out["found"] = np.array([int(p["found"]) for p in parts], np.int64)
    out["embedded"] = np.array([int(p["embedded"]) for p in parts], np.int64)
    out["dropped"] = np.array([str(p.get("dropped") or "") for p in parts])
    return out
