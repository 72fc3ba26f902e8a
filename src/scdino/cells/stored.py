"""Cell settings a plate carries in its own metadata: how its nuclei are best found and cut.

A plate may store, in its root attributes under :data:`KEY`, the options that fit its images (the sample plates do:
``scdino-engine sample-plate``), so that ``scdino-engine run sample.zarr --out cells.zarr`` needs no flags. An option
given on the command line (or to :func:`scdino.embed`) always wins; a run records which settings came from where.

Light on purpose (json only): read before any reader or model is opened.
"""

from __future__ import annotations

import json
import os
from dataclasses import fields
from pathlib import Path
from typing import Any

from scdino.cells.options import CellOptions, SegmentParams
from scdino.errors import InputError

#: the root attribute of an OME-Zarr plate that holds its cell settings
KEY = "scdino_cell_settings"

#: the settings a plate may carry: CellOptions' fields (its segmentation flattened into them), as the run options
SETTINGS = tuple(f.name for f in fields(CellOptions) if f.name != "segment") + tuple(
    f.name for f in fields(SegmentParams)
)


def _root_attributes(path: Path) -> dict:
    """The root attributes of a zarr group at ``path`` (v3 ``zarr.json`` or v2 ``.zattrs``); {} for anything else."""
    for meta in ("zarr.json", ".zattrs"):
        f = path / meta
        if f.is_file():
            try:
                attrs = json.loads(f.read_text())
            except (OSError, ValueError):
                return {}
            attrs = attrs.get("attributes", {}) if meta == "zarr.json" else attrs
            return attrs if isinstance(attrs, dict) else {}
    return {}


def stored_settings(path: str | os.PathLike) -> dict[str, Any]:
    """The cell settings the plate at ``path`` carries ({} where it carries none, or is not a zarr folder)."""
    p = Path(path)
    if not p.is_dir():
        return {}
    got = _root_attributes(p).get(KEY)
    if got is None:
        return {}
    if not isinstance(got, dict):
        raise InputError(f"{path}: attribute {KEY!r} is {type(got).__name__}; expected a mapping of option: value")
    unknown = sorted(set(got) - set(SETTINGS))
    if unknown:
        raise InputError(
            f"{path}: attribute {KEY!r} names unknown option(s) {', '.join(unknown)}; expected some of "
            f"{', '.join(SETTINGS)} (edit or remove it)"
        )
    return dict(got)
