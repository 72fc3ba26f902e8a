"""Read OME-Zarr HCS plates (NGFF 0.4 on zarr v2, NGFF 0.5 on zarr v3) with zarr-python.

Only metadata the engine needs is read: the plate's wells, each well's fields, each field's level-0 array, its axes,
pixel size, channel names (``omero``) and label images (``labels/``). The reader is tolerant of the small
differences between writers (e.g. a ``labels`` group without ``version``), strict about what changes results
(axes, channel names, array shapes), and every error names the path inside the plate.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Sequence

import numpy as np
import zarr

from scdino.cells.pixels import check_finite, check_labels
from scdino.errors import ConfigError, InputError

log = logging.getLogger(__name__)


def _ome(attrs: dict) -> dict:
    """NGFF 0.5 keeps its metadata under ``ome``; 0.4 at the top level."""
    return attrs["ome"] if isinstance(attrs.get("ome"), dict) else attrs


@dataclass(frozen=True)
class FieldRef:
    """One field (image) of a well: ``well`` is ``"B/03"``, ``path`` the image path inside the plate."""

    well: str
    field: str

    @property
    def path(self) -> str:
        return f"{self.well}/{self.field}"


@dataclass(frozen=True)
class Multiscale:
    axes: tuple[str, ...]
    array: zarr.Array
    #: micrometres per pixel along (y, x) where the axes carry a length unit, else None
    pixel_size: tuple[float, float] | None


def class_tiffs_hint(path: str | os.PathLike) -> str | None:
    """What to say of a folder of single-cell TIFFs in one sub-folder per class (the published scDINO layout) given
    where a plate or a store is expected: the command that makes it one. None for any other path."""
    p = str(path)
    try:
        subs = [e for e in os.scandir(p) if e.is_dir()]
        tiffs = any(f.name.lower().endswith((".tif", ".tiff")) for d in subs[:20] for f in os.scandir(d.path))
    except OSError:
        return None
    if not tiffs:
        return None
    return (
        f"{p}: a folder of single-cell TIFFs in class sub-folders, not a plate or a crop store; make it a crop store "
        f"first: scdino-engine ingest {p} crops.zarr --channels NAME1,NAME2,... and pass crops.zarr"
    )


def _open_group(path: str | os.PathLike, what: str) -> zarr.Group:
    try:
        return zarr.open_group(str(path), mode="r")
    except (FileNotFoundError, zarr.errors.GroupNotFoundError) as exc:
        raise InputError(class_tiffs_hint(path) or f"{path}: no zarr group here; expected {what}") from exc
    except Exception as exc:  # zarr raises various errors for corrupt metadata
        raise InputError(
            f"{path}: cannot be opened as a zarr group ({type(exc).__name__}: {exc}); expected {what}"
        ) from exc


def child(group: zarr.Group, key: str, where: str) -> Any:
    """``group[key]``: a KeyError where it is missing on disk, one clear error where its metadata (``zarr.json``, or
    ``.zgroup`` / ``.zarray`` / ``.zattrs``) cannot be read."""
    try:
        return group[key]
    except KeyError:
        raise
    except Exception as exc:  # zarr raises JSONDecodeError, ValueError, TypeError... for damaged metadata
        raise InputError(
            f"{where}: its zarr metadata cannot be read ({type(exc).__name__}: {str(exc)[:200]}); the plate is damaged "
            "or incomplete: copy or convert it again, or select other wells with --wells"
        ) from exc


def canonical_well(well: str) -> str:
    """``A/1``, ``A/01``, ``A01``, ``a1`` -> ``A/1`` (row letters, column number): one well whichever form a plate or a
    plate map writes it in."""
    m = re.fullmatch(r"\s*([A-Za-z]+)\s*/?\s*0*(\d+)\s*", str(well))
    if not m:
        raise ConfigError(f"well {well!r}: expected a row letter and a column number, e.g. B03 or B/3")
    return f"{m.group(1).upper()}/{int(m.group(2))}"


def _well_key(well: str) -> str:
    """The plate's well path in canonical form where it has one (a well named otherwise is matched as it is)."""
    try:
        return canonical_well(well)
    except ConfigError:
        return well


_UNIT_TO_UM = {"micrometer": 1.0, "nanometer": 1e-3, "millimeter": 1e3, "meter": 1e6, "angstrom": 1e-4}


def read_multiscale(group: zarr.Group, where: str) -> Multiscale:
    """Level 0 of the multiscale image in ``group``."""
    meta = _ome(dict(group.attrs))
    ms = meta.get("multiscales")
    if not ms:
        raise InputError(f"{where}: no 'multiscales' metadata; expected an OME-Zarr image")
    ms0 = ms[0]
    axes = tuple((a["name"] if isinstance(a, dict) else a).lower() for a in ms0.get("axes", []))
    ds0 = ms0["datasets"][0]
    try:
        arr = child(group, ds0["path"], f"{where}/{ds0['path']}")
    except KeyError as exc:
        raise InputError(f"{where}: multiscale level {ds0['path']!r} is missing") from exc
    if not axes:  # NGFF < 0.4 had no axes: (t, c, z, y, x)
        axes = ("t", "c", "z", "y", "x")[-arr.ndim :]
    if len(axes) != arr.ndim:
        raise InputError(f"{where}: {len(axes)} axes in the metadata but the array has {arr.ndim} dimensions")
    pixel = None
    scale = next((t["scale"] for t in ds0.get("coordinateTransformations", []) if t.get("type") == "scale"), None)
    units = [a.get("unit") if isinstance(a, dict) else None for a in ms0.get("axes", [])]
    if scale is not None and "y" in axes and "x" in axes:
        iy, ix = axes.index("y"), axes.index("x")
        uy, ux = (units[iy], units[ix]) if units else (None, None)
        if uy in _UNIT_TO_UM and ux in _UNIT_TO_UM:
            pixel = (float(scale[iy]) * _UNIT_TO_UM[uy], float(scale[ix]) * _UNIT_TO_UM[ux])
    return Multiscale(axes, arr, pixel)


class Plate:
    """An opened HCS plate. Cheap to create and to pickle (it holds the path; zarr groups open lazily)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = str(path).rstrip("/")
        root = _open_group(self.path, "an OME-Zarr HCS plate (a folder with plate metadata)")
        meta = _ome(dict(root.attrs))
        if "plate" not in meta:
            kind = "an image" if "multiscales" in meta else "a zarr group"
            raise InputError(
                f"{self.path}: not an OME-Zarr HCS plate ({kind} without 'plate' metadata); "
                "scdino-engine run expects a plate with wells and fields, e.g. one written by "
                "'scdino-engine sample-plate' or by an OME-Zarr converter"
            )
        self.version = str(meta.get("version") or meta["plate"].get("version") or "0.4")
        self.plate_meta: dict[str, Any] = meta["plate"]
        self.name: str = str(self.plate_meta.get("name") or os.path.basename(self.path))
        self.zarr_format = root.metadata.zarr_format

    def __reduce__(self):
        return (Plate, (self.path,))

    @cached_property
    def _root(self) -> zarr.Group:
        return zarr.open_group(self.path, mode="r")

    @property
    def wells(self) -> list[str]:
        return [w["path"] for w in self.plate_meta.get("wells", [])]

    def fields(self, wells: Sequence[str] | None = None) -> list[FieldRef]:
        """All fields of the selected wells (all wells by default), in plate order."""
        names = self.wells
        if wells:  # A/1, A1 and A01 name one well, as plate maps write it
            keys = {_well_key(n): n for n in reversed(names)}
            want = [w.strip().strip("/") for w in wells]
            found = {w: w if w in names else keys.get(_well_key(w)) for w in want}
            unknown = [w for w, n in found.items() if n is None]
            if unknown:
                raise ConfigError(f"{self.path}: no well {', '.join(unknown)}; wells are {', '.join(names[:12])}...")
            chosen = set(found.values())
            names = [w for w in names if w in chosen]
        out: list[FieldRef] = []
        for w in names:
            try:
                g = child(self._root, w, f"{self.path}/{w}")
            except KeyError as exc:
                raise InputError(f"{self.path}/{w}: listed in the plate metadata but missing on disk") from exc
            wmeta = _ome(dict(g.attrs)).get("well")
            if not wmeta:
                raise InputError(f"{self.path}/{w}: no 'well' metadata; expected an OME-Zarr well")
            out.extend(FieldRef(w, str(im["path"])) for im in wmeta.get("images", []))
        return out

    def _field(self, ref: FieldRef) -> zarr.Group:
        try:
            return child(self._root, ref.path, f"{self.path}/{ref.path}")
        except KeyError as exc:
            raise InputError(
                f"{self.path}/{ref.path}: field listed in the well metadata but missing on disk; the plate is "
                "incomplete: copy or convert it again, or select other wells with --wells"
            ) from exc

    def image(self, ref: FieldRef) -> Multiscale:
        return read_multiscale(self._field(ref), f"{self.path}/{ref.path}")

    def channel_names(self, ref: FieldRef) -> list[str]:
        """Channel names from ``omero``; ``"0"``, ``"1"``... where the plate has none."""
        g = self._field(ref)
        meta = _ome(dict(g.attrs))
        ms = self.image(ref)
        n = ms.array.shape[ms.axes.index("c")] if "c" in ms.axes else 1
        chans = (meta.get("omero") or {}).get("channels") or []
        names = [str(c.get("label") or i) for i, c in enumerate(chans)]
        if len(names) != n:
            if names:
                log.warning(
                    "%s/%s: %d omero channels for %d image channels; using indices", self.path, ref.path, len(names), n
                )
            names = [str(i) for i in range(n)]
        return names

    def missing_chunks(self, ref: FieldRef) -> str | None:
        """What to say when the field's image lacks chunk files, else None. Zarr reads a missing chunk as the fill
        value, so a copy that lost files gives blank regions and loses cells without an error; writers may also skip
        chunks that hold only the fill value, so this is a warning, not a refusal. Label images are not checked: their
        background chunks are all 0 and often rightly not stored."""
        arr = self.image(ref).array
        missing = arr.nchunks - arr.nchunks_initialized
        if missing <= 0:
            return None
        return (
            f"{self.path}/{ref.path}: {missing} of {arr.nchunks} image chunks are not stored and are read as the fill "
            f"value {arr.fill_value}, so cells there are lost or blank; if the plate was copied or converted "
            "incompletely, copy it again"
        )

    def label_names(self, ref: FieldRef) -> list[str]:
        try:
            g = child(self._root, f"{ref.path}/labels", f"{self.path}/{ref.path}/labels")
        except KeyError:
            return []
        return [str(n) for n in _ome(dict(g.attrs)).get("labels", [])]

    def labels(self, ref: FieldRef, name: str) -> np.ndarray:
        """The label image ``labels/<name>`` of a field as a 2-D integer array."""
        have = self.label_names(ref)
        if name not in have:
            raise InputError(missing_labels_message(f"{self.path}/{ref.path}", name, have))
        where = f"{self.path}/{ref.path}/labels/{name}"
        ms = read_multiscale(child(self._root, f"{ref.path}/labels/{name}", where), where)
        labels = squeeze_2d(read_array(ms.array, where), ms.axes, where)
        check_labels(labels, where)
        return labels

    def read(
        self, ref: FieldRef, channels: Sequence[int], y: slice = slice(None), x: slice = slice(None)
    ) -> np.ndarray:
        """Raw pixels (C, Y, X) of the selected channels, in the stored dtype."""
        ms = self.image(ref)
        idx: list[Any] = []
        where = f"{self.path}/{ref.path}"
        for ax, n in zip(ms.axes, ms.array.shape):
            if ax == "c":
                chans = list(channels)
                # ascending neighbours as a slice: zarr's basic selection decodes about twice as fast as a list's
                # orthogonal one (36 against 72 ms for three channels of a 2048 px field)
                contiguous = chans == list(range(chans[0], chans[0] + len(chans))) if chans else False
                idx.append(slice(chans[0], chans[-1] + 1) if contiguous else chans)
            elif ax == "y":
                idx.append(y)
            elif ax == "x":
                idx.append(x)
            else:
                if n != 1:
                    raise InputError(
                        f"{where}: axis {ax!r} has {n} planes; scdino reads 2-D fields (c, y, x): "
                        "store time points or z-planes as separate fields, or project them first"
                    )
                idx.append(0)
        if "c" not in ms.axes:
            if list(channels) != [0]:
                raise InputError(f"{where}: single-channel image, channels {list(channels)} requested")
        data = read_array(ms.array, where, tuple(idx))
        if "c" not in ms.axes:
            data = data[None]
        check_finite(data, where, lambda: [self.channel_names(ref)[c] for c in channels])
        return data


def missing_labels_message(where: str, name: str, have: Sequence[str]) -> str:
    """What to say when a field has no label image ``name`` (``have``: the label images it has)."""
    if have:
        return (
            f"{where}: no label image {name!r} (labels: {', '.join(have)}); pass --labels with one of them, "
            "or drop --labels to segment nuclei with the built-in segmentation (--segment-channel)"
        )
    return (
        f"{where}: no label image {name!r} (the field has no label images at all); drop --labels to segment nuclei "
        "with the built-in segmentation (--segment-channel)"
    )


def read_array(arr: zarr.Array, where: str, idx: tuple | None = None) -> np.ndarray:
    """Read ``arr[idx]`` (orthogonal indexing), turning zarr/codec failures into one clear error."""
    try:
        if idx is None:
            return arr[...]
        if all(isinstance(i, (int, slice)) for i in idx):
            return arr[idx]
        return arr.oindex[idx]
    except Exception as exc:  # codecs raise anything from ValueError to RuntimeError on a damaged chunk
        raise InputError(
            f"{where}: a chunk cannot be read ({type(exc).__name__}: {str(exc)[:200]}); the store is damaged or "
            "incomplete: copy or convert the plate again"
        ) from exc


def squeeze_2d(arr: np.ndarray, axes: Sequence[str], where: str) -> np.ndarray:
    keep = [i for i, a in enumerate(axes) if a in ("y", "x")]
    drop = tuple(i for i in range(arr.ndim) if i not in keep)
    if any(arr.shape[i] != 1 for i in drop):
        raise InputError(f"{where}: label image of shape {arr.shape} ({''.join(axes)}) is not 2-D")
    return arr.squeeze(axis=drop) if drop else arr


def resolve_channels(
    names: Sequence[str], wanted: Sequence[str] | None, where: str, option: str = "--channels"
) -> list[int]:
    """Indices of ``wanted`` channels (names or integer indices) among ``names``; all channels when None. ``option`` is
    the command-line option the names came from (named in the error)."""
    if not wanted:
        return list(range(len(names)))
    out = []
    for w in wanted:
        w = str(w).strip()
        if w in names:
            out.append(names.index(w))
        elif w.isdigit() and int(w) < len(names):
            out.append(int(w))
        else:
            raise ConfigError(
                f"{where}: no channel {w!r}; channels are {', '.join(names)}; pass {option} with names or indices"
            )
    return out
