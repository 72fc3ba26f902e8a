"""``scdino.open``: an embeddings store as AnnData, once its run is complete."""

from __future__ import annotations

from typing import TYPE_CHECKING

from scdino.engine.output import open_cells

if TYPE_CHECKING:
    import anndata


def open(path: str) -> anndata.AnnData:  # noqa: A001 - scdino.open, as anndata.read_zarr; the builtin is not used here
    """The store ``scdino-engine run`` (or :func:`scdino.embed`) wrote at ``path``, as AnnData. A store whose run is
    unfinished is one clear error saying how many blocks are embedded and to run the same command again to resume it
    (``anndata.read_zarr`` fails on it too: the store becomes AnnData only when complete)."""
    return open_cells(str(path))
