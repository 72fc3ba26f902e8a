"""Where cells come from: OME-Zarr plates, LoadData CSVs and crop stores behind one protocol
(:class:`scdino.cells.base.CellSource`).

* :mod:`~scdino.cells.base` — the protocol, the registry of kinds (``@register``) and what sources share;
* :mod:`~scdino.cells.options` — :class:`CellOptions` / :class:`SegmentParams`, the defaults of how cells are found;
* :mod:`~scdino.cells.plate` — the OME-Zarr HCS plate reader (NGFF 0.4 and 0.5);
* :mod:`~scdino.cells.segment` — built-in nucleus segmentation;
* :mod:`~scdino.cells.table` — the cell table of a field and mass-centred crops cut from it;
* :mod:`~scdino.cells.cropstore` — crop stores (cells already cut, e.g. the paper's TIFF folders ingested);
* :mod:`~scdino.cells.loaddata` — CellProfiler LoadData CSVs (one TIFF per channel per site);
* :mod:`~scdino.cells.source` — :func:`open_source`, the one entry point every command uses.

Only the options are imported here, so that the command line can show their defaults without numpy or zarr.
"""

from scdino.cells.options import DEFAULT_CROP_SIZE, CellOptions, SegmentParams

__all__ = ["DEFAULT_CROP_SIZE", "CellOptions", "SegmentParams"]
