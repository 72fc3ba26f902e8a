"""Real sample plates, written as OME-Zarr HCS plates from microscopy images shipped in PyPI packages.

* ``neocortex``: the 3-marker mouse neocortex image of ``ndev-sampledata`` (nuclear markers CTIP2, BRN2, ROR;
  hundreds of nuclei, no masks), cut into 4 tiles laid out as wells A/1 and A/2 with 2 fields each.
* ``scratch``: the scratch assay of ``ndev-sampledata`` (Hoechst ``H3342`` + ``oblique`` transmitted light, 10 time
  points, 0.619 um pixels) with its nucleus and cytoplasm label images; time point t is well A/<t+1>, one field each.

Needs the ``[samples]`` extra (ndev-sampledata, tifffile, ome-zarr).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from scdino._optional import MissingDependencyError, pip_extra, require
from scdino.errors import ConfigError
from scdino.outputs import claim_new, mark

log = logging.getLogger(__name__)

DATASETS = ("neocortex", "scratch", "neocortex-wells")

#: the neocortex image's small, dense nuclei in three mutually exclusive markers: its cell settings
NEOCORTEX_CELLS = {
    "segment_channel": "CTIP2,BRN2,ROR",
    "sigma": 1.0,
    "min_distance": 4,
    "min_area": 15,
    "crop_size": 32,
}
#: what each sample plate carries in its metadata (scdino.cells.stored), so that a run of it needs no options
SAMPLE_CELL_SETTINGS = {"neocortex": NEOCORTEX_CELLS, "neocortex-wells": NEOCORTEX_CELLS, "scratch": {}}

#: the plate map written beside the ``neocortex-wells`` sample: a made-up layout to try profiles on real images
SAMPLE_PLATE_MAP = {
    "A/1": "DMSO",
    "B/1": "DMSO",
    "A/2": "drug-a",
    "B/2": "drug-a",
    "A/3": "drug-b",
    "B/3": "drug-b",
    "A/4": "drug-c",
    "B/4": "drug-c",
}


@dataclass
class FieldImage:
    """One field: pixels (C, Y, X) and optional 2-D label images by name."""

    image: np.ndarray
    labels: Mapping[str, np.ndarray] = field(default_factory=dict)


def write_plate(
    path: str | os.PathLike,
    wells: Mapping[str, Sequence[FieldImage]],
    channel_names: Sequence[str],
    pixel_size_um: float | None = None,
    ngff: str = "0.5",
    name: str | None = None,
    overwrite: bool = False,
    cell_settings: Mapping[str, object] | None = None,
) -> str:
    """Write an OME-Zarr HCS plate with ome-zarr-py (NGFF 0.5 on zarr v3, or 0.4 on zarr v2).

    ``wells`` maps ``"A/1"`` to its fields; ``cell_settings``: run options stored with the plate
    (:mod:`scdino.cells.stored`). Returns the path.
    """
    zarr = require("zarr")
    writer = require("ome_zarr.writer")
    fmt_mod = require("ome_zarr.format")
    if ngff not in ("0.4", "0.5"):
        raise ConfigError(f"NGFF version {ngff!r} is not supported; use 0.4 (zarr v2) or 0.5 (zarr v3)")
    fmt = fmt_mod.FormatV05() if ngff == "0.5" else fmt_mod.FormatV04()
    path = str(path)
    claim_new(path, "scdino-engine sample-plate", overwrite=overwrite, option="OUT")
    root = zarr.open_group(path, mode="w", zarr_format=3 if ngff == "0.5" else 2)
    mark(path, "scdino-engine sample-plate")
    rows = sorted({w.split("/")[0] for w in wells})
    cols = sorted({w.split("/")[1] for w in wells}, key=lambda c: (len(c), c))
    nfield = max(len(f) for f in wells.values())
    writer.write_plate_metadata(
        root, rows, cols, list(wells), fmt=fmt, field_count=nfield, name=name or os.path.basename(path.rstrip("/"))
    )
    if cell_settings:
        from scdino.cells.stored import KEY

        root.attrs[KEY] = dict(cell_settings)
    extra = {}
    if pixel_size_um is not None:
        extra = {
            "scale": {"c": 1.0, "y": pixel_size_um, "x": pixel_size_um},
            "axes_units": {"y": "micrometer", "x": "micrometer"},
        }
    for well, fields in wells.items():
        r, c = well.split("/")
        wg = root.require_group(r).require_group(c)
        writer.write_well_metadata(wg, [{"path": str(i)} for i in range(len(fields))], fmt=fmt)
        for i, f in enumerate(fields):
            if f.image.ndim != 3 or f.image.shape[0] != len(channel_names):
                raise ConfigError(f"{well}/{i}: image of shape {f.image.shape}, expected ({len(channel_names)}, y, x)")
            g = wg.require_group(str(i))
            writer.write_image(
                f.image, g, axes="cyx", fmt=fmt, scale_factors=[], storage_options={"chunks": (1, 512, 512)}, **extra
            )
            writer.add_metadata(
                g, {"omero": {"channels": [{"label": n, "active": True} for n in channel_names]}}, fmt=fmt
            )
            for lname, lab in f.labels.items():
                lextra = {k: {a: v[a] for a in ("y", "x")} for k, v in extra.items()}
                writer.write_labels(
                    lab.astype(np.int32 if np.issubdtype(lab.dtype, np.signedinteger) else np.uint32),
                    g,
                    name=lname,
                    axes="yx",
                    fmt=fmt,
                    scale_factors=[],
                    **lextra,
                )
    return path


def _ndev(name: str) -> np.ndarray:
    # the files are located, not imported: importing ndev_sampledata would pull in bioio and napari readers
    import importlib.metadata as md

    tifffile = require("tifffile")
    try:
        f = md.distribution("ndev-sampledata").locate_file(f"ndev_sampledata/samples/{name}")
    except md.PackageNotFoundError as exc:
        raise MissingDependencyError(
            "the sample images come from the ndev-sampledata package, which is not installed; "
            f"run: {pip_extra('samples')}"
        ) from exc
    return tifffile.imread(f)


def sample_wells(dataset: str) -> tuple[dict[str, list[FieldImage]], list[str], float | None]:
    """Wells, channel names and pixel size of a sample ``dataset``."""
    if dataset == "neocortex":
        img = _ndev("neocortex-3Ch.tiff")  # (3, 1112, 402) uint16
        h = img.shape[1] // 4
        tiles = [FieldImage(np.ascontiguousarray(img[:, i * h : (i + 1) * h])) for i in range(4)]
        return {"A/1": tiles[:2], "A/2": tiles[2:]}, ["CTIP2", "BRN2", "ROR"], None
    if dataset == "neocortex-wells":  # 8 tiles as the wells of two plate rows, one field each
        img = _ndev("neocortex-3Ch.tiff")
        h = img.shape[1] // 8
        wells = {
            w: [FieldImage(np.ascontiguousarray(img[:, i * h : (i + 1) * h]))] for i, w in enumerate(SAMPLE_PLATE_MAP)
        }
        return wells, ["CTIP2", "BRN2", "ROR"], None
    if dataset == "scratch":
        img = _ndev("scratch-assay-labeled-10T-2Ch.tiff")  # (4, 10, 210, 576): H3342, oblique, nuclei, cyto
        wells = {
            f"A/{t + 1}": [FieldImage(np.ascontiguousarray(img[:2, t]), {"nuclei": img[2, t], "cyto": img[3, t]})]
            for t in range(img.shape[1])
        }
        return wells, ["H3342", "oblique"], 0.619
    raise ConfigError(f"unknown sample dataset {dataset!r}; choose one of {', '.join(DATASETS)}")


def write_sample_plate(
    path: str | os.PathLike, dataset: str = "neocortex", ngff: str = "0.5", overwrite: bool = False
) -> str:
    """Write the sample ``dataset`` as an HCS plate at ``path``."""
    wells, names, px = sample_wells(dataset)
    out = write_plate(
        path,
        wells,
        names,
        px,
        ngff=ngff,
        name=f"scdino-sample-{dataset}",
        overwrite=overwrite,
        cell_settings=SAMPLE_CELL_SETTINGS[dataset],
    )
    if dataset == "neocortex-wells":
        write_sample_plate_map(plate_map_path(out))
    return out


def plate_map_path(plate: str | os.PathLike) -> str:
    """``wells.zarr`` -> ``wells_plate_map.csv`` beside it."""
    p = str(plate).rstrip("/")
    return (p[:-5] if p.endswith(".zarr") else p) + "_plate_map.csv"


def write_sample_plate_map(path: str) -> None:
    """The ``neocortex-wells`` sample's plate map (``well_position``, ``treatment``; wells written ``A01``: the names
    pycytominer's ``annotate`` joins on by default); replaced only if scdino wrote it."""
    from scdino.outputs import claim_file

    claim_file(
        path, option="OUT", ours=lambda p: p.read_text().startswith(("well_position,treatment\n", "well,treatment\n"))
    )
    lines = ["well_position,treatment"] + [
        f"{w.replace('/', '0') if len(w) == 3 else w.replace('/', '')},{t}" for w, t in SAMPLE_PLATE_MAP.items()
    ]
    Path(path).write_text("\n".join(lines) + "\n")


def neocortex_segment_params():
    """Nucleus segmentation that fits the neocortex sample's small, dense nuclei (:data:`NEOCORTEX_CELLS`)."""
    from scdino.cells.options import SegmentParams

    return SegmentParams(**{k: v for k, v in NEOCORTEX_CELLS.items() if k in SegmentParams.__dataclass_fields__})


def verification_crops(n: int = 48, crop: int = 48) -> np.ndarray:
    """Real uint16 crops (n, 3, crop, crop) of neocortex nuclei, evenly spread over the image, for export checks.

    The package ships their output as ``scdino/data/verify_crops.npz`` (made by this function, checked by a test),
    so that exporting needs no sample package.
    """
    from scdino.cells.segment import segment_nuclei
    from scdino.cells.table import segmentation_image

    img = _ndev("neocortex-3Ch.tiff")
    lab = segment_nuclei(segmentation_image(img), neocortex_segment_params())
    from skimage.measure import regionprops

    props = regionprops(lab)
    pick = np.linspace(0, len(props) - 1, n).round().astype(int)
    pad = np.pad(img, ((0, 0), (crop, crop), (crop, crop)))
    out = np.zeros((n, img.shape[0], crop, crop), img.dtype)
    for j, i in enumerate(pick):
        cy, cx = (int(round(v)) for v in props[i].centroid)
        out[j] = pad[
            :, cy + crop - crop // 2 : cy + 2 * crop - crop // 2, cx + crop - crop // 2 : cx + 2 * crop - crop // 2
        ]
    return out
