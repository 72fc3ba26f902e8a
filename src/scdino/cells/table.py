"""Cells of a plate: the cell table (one row per nucleus) and mass-centred raw crops read from it.

Phase 1 (:func:`field_cells`) finds nuclei in a field (stored labels or built-in segmentation), places an
S x S window on each nucleus' intensity-weighted centroid on the segmentation channel, and orders the field's cells by
position (rows of the image, top to bottom, then left to right), so that a run of consecutive cells (a block of the
engine) lies in one band of one field. Phase 2 (:func:`read_crops`) reads those windows for any run of table rows: each
field is decoded once per process and kept while its blocks are read (:class:`FieldCache`), fields too large for that
are read region by region.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd
from numpy.lib.stride_tricks import sliding_window_view

from scdino.cells.options import DEFAULT_CROP_SIZE, CellOptions
from scdino.cells.plate import FieldRef, Plate, resolve_channels
from scdino.cells.segment import segment_nuclei
from scdino.errors import ConfigError, InputError

log = logging.getLogger(__name__)

#: columns of the cell table, in order
COLUMNS = [
    "plate",
    "well",
    "field",
    "label",
    "centroid_y",
    "centroid_x",
    "bbox_y0",
    "bbox_x0",
    "bbox_y1",
    "bbox_x1",
    "area",
    "crop_y0",
    "crop_x0",
    "border",
]


@dataclass(frozen=True)
class FieldPlan:
    """What phase 1 resolved for a field: channel indices and the crop size in pixels."""

    ref: FieldRef | None
    channels: tuple[int, ...]
    channel_names: tuple[str, ...]
    seg_channels: tuple[int, ...]
    crop: int


def plan_field(plate: Plate, ref: FieldRef, opts: CellOptions) -> FieldPlan:
    where = f"{plate.path}/{ref.path}"
    names = plate.channel_names(ref)
    chans, seg = select_channels(names, opts, where)
    image = plate.image(ref)
    h, w = (image.array.shape[image.axes.index(a)] if a in image.axes else 1 for a in ("y", "x"))
    crop = crop_pixels(opts, (h, w), image.pixel_size, where)
    return FieldPlan(ref, tuple(chans), tuple(names[c] for c in chans), tuple(seg), crop)


def select_channels(names: Sequence[str], opts: CellOptions, where: str) -> tuple[list[int], list[int]]:
    """(model input channels, segmentation channels) as indices into ``names``, from ``opts``."""
    chans = resolve_channels(names, opts.channels, where)
    if opts.segment_channel is None:
        return chans, [chans[0]]
    wanted = [c for c in str(opts.segment_channel).split(",") if c.strip()]
    return chans, resolve_channels(names, wanted, where, option="--segment-channel")


def crop_pixels(opts: CellOptions, shape: tuple[int, int], pixel_size: tuple[float, float] | None, where: str) -> int:
    """The crop side in pixels for a field of ``shape`` (y, x) with ``pixel_size`` (um, or None when unknown)."""
    if opts.crop_um is not None:
        if pixel_size is None:
            raise ConfigError(f"{where}: the pixel size is not in the image metadata; use --crop-size in pixels")
        crop = int(round(opts.crop_um / pixel_size[0]))
    else:
        crop = opts.crop_size or DEFAULT_CROP_SIZE
    if crop < 4:
        raise ConfigError(f"{where}: crop of {crop} px is too small; expected at least 4 px")
    h, w = shape
    if crop > max(h, w):
        fix = "a --crop-um that gives" if opts.crop_um is not None else "--crop-size"
        raise ConfigError(
            f"{where}: crop of {crop} px is larger than the field ({h} x {w} px); pass {fix} at most {max(h, w)} px"
        )
    return crop


def segmentation_image(pixels: np.ndarray) -> np.ndarray:
    """The image nuclei are found and centred on: the channel itself, or the percentile-scaled maximum of several."""
    if len(pixels) == 1:
        return pixels[0]
    out = np.zeros(pixels.shape[1:], np.float32)
    for ch in pixels.astype(np.float32):
        lo, hi = np.percentile(ch, [1.0, 99.8])
        if hi > lo:
            np.maximum(out, np.clip((ch - lo) / (hi - lo), 0, 1), out=out)
    return out


def object_measures(labels: np.ndarray, img: np.ndarray, geometric: bool = True) -> dict[str, np.ndarray]:
    """Label, centroid, intensity-weighted centroid, bounding box and area of every object of ``labels``, keyed as
    scikit-image's ``regionprops_table`` keys them, in label order (equal to it within 1e-13 px on the sample and scale
    plates). Sums over the labelled pixels with ``np.bincount`` for all objects at once: regionprops builds a Python
    object per nucleus, 0.10 s for a field of 1,024 of them against 0.03 s here. ``geometric=False``: the plain
    centroids (``centroid-0/1``) only where an object has no signal (no weighted centroid), else left out: two passes
    over the pixels fewer, for callers that use them only there."""
    if labels.ndim != 2:
        raise InputError(f"labels of shape {labels.shape}; expected a 2-D label image")
    width = labels.shape[1]
    flat = labels.ravel()
    where = np.flatnonzero(flat > 0)  # 0 is background; negative values (an "ignore" mark) are no objects either
    values = flat[where]
    top = int(values.max()) if values.size else 0
    if top <= flat.size:  # label values as bin numbers: no sort (np.unique took half the time of a 2048 px field)
        lab, slots = values.astype(np.intp), top + 1
        ids = np.flatnonzero(np.bincount(lab, minlength=slots))
        pick: Any = ids
    else:  # very large label values: objects numbered 0..n-1 in label order
        ids, lab = np.unique(values, return_inverse=True)
        slots, pick = len(ids), slice(None)
    ys, xs = np.divmod(where, width)  # integers: products with float64 weights convert them exactly
    w = np.asarray(img).ravel()[where].astype(np.float64)

    def per_object(weights=None) -> np.ndarray:
        return np.bincount(lab, weights=weights, minlength=slots)[pick]

    area = per_object()
    total = per_object(w)
    with np.errstate(invalid="ignore", divide="ignore"):  # an object without signal has no weighted centroid: NaN
        wy, wx = per_object(w * ys) / total, per_object(w * xs) / total
    wy[total == 0] = wx[total == 0] = np.nan
    box = np.empty((len(ids), 4), np.int64)
    for k, (arr, fn) in enumerate(((ys, np.minimum), (xs, np.minimum), (ys, np.maximum), (xs, np.maximum))):
        col = np.full(slots, np.iinfo(np.int64).max if fn is np.minimum else -1, np.int64)
        fn.at(col, lab, arr)
        box[:, k] = col[pick] + (k >= 2)  # regionprops' bbox ends are exclusive
    out = {
        "label": ids.astype(np.int64),
        "centroid_weighted-0": wy,
        "centroid_weighted-1": wx,
        **{f"bbox-{k}": box[:, k] for k in range(4)},
        "area": area.astype(np.int64),
    }
    if geometric or (total == 0).any():
        out["centroid-0"] = per_object(ys.astype(np.float64)) / area
        out["centroid-1"] = per_object(xs.astype(np.float64)) / area
    return out


def field_cells(plate: Plate, ref: FieldRef, opts: CellOptions) -> pd.DataFrame:
    """The cell table of one field of a plate (may be empty)."""
    plan = plan_field(plate, ref, opts)
    where = f"{plate.path}/{ref.path}"
    img = plate.read(ref, list(plan.seg_channels))
    labels = plate.labels(ref, opts.labels) if opts.labels else None
    keys = {"plate": plate.name, "well": ref.well, "field": ref.field}
    label_where = f"{where}/labels/{opts.labels}"
    return image_cells(img, labels, plan.crop, opts, keys, where, label_where)


def field_cells_and_crops(
    plate: Plate, ref: FieldRef, opts: CellOptions, dtype: np.dtype, alloc: Callable = np.empty
) -> tuple[pd.DataFrame, np.ndarray]:
    """The cell table of one field and the raw crops of its cells (n, C, S, S) in table order, from one decode of the
    field: the model's and the segmentation's channels are read together, once. ``alloc(shape, dtype)`` makes the
    crops array (a feeder process allocates it in memory it hands to its parent without a copy)."""
    plan = plan_field(plate, ref, opts)
    where = f"{plate.path}/{ref.path}"
    read = OneRead(plan.channels, plan.seg_channels)
    pixels = plate.read(ref, read.wanted)
    labels = plate.labels(ref, opts.labels) if opts.labels else None
    keys = {"plate": plate.name, "well": ref.well, "field": ref.field}
    seg = read.pick(pixels, plan.seg_channels)
    table = image_cells(seg, labels, plan.crop, opts, keys, where, f"{where}/labels/{opts.labels}")
    return table, table_crops(read.pick(pixels, plan.channels), table, plan.crop, dtype, alloc)


class OneRead:
    """The channels of a field read once for both the model (``channels``) and the segmentation (``seg``): which to
    read, in ascending order (neighbours read as one slice), and each set's planes from what was read."""

    def __init__(self, channels: Sequence[int], seg: Sequence[int] = ()) -> None:
        self.wanted = sorted(set(channels) | set(seg))
        self.at = {c: k for k, c in enumerate(self.wanted)}

    def pick(self, pixels: np.ndarray, channels: Sequence[int]) -> np.ndarray:
        """The planes of ``channels`` (C, Y, X), in their order: ``pixels`` itself or a view where they are all of it
        or one plane, else a copy."""
        if list(channels) == self.wanted:
            return pixels
        if len(channels) == 1:
            return pixels[self.at[channels[0]]][None]
        return pixels[[self.at[c] for c in channels]]


def table_crops(
    pixels: np.ndarray, table: pd.DataFrame, crop: int, dtype: np.dtype, alloc: Callable = np.empty
) -> np.ndarray:
    """The crops (n, C, crop, crop) of ``table``'s cells cut from a whole field's ``pixels`` (C, Y, X), in a new array
    ``alloc(shape, dtype)`` makes."""
    crops = alloc((len(table), pixels.shape[0], crop, crop), np.dtype(dtype))
    if len(table):
        y0s, x0s = table["crop_y0"].to_numpy(), table["crop_x0"].to_numpy()
        cut_crops(pixels, (0, 0), pixels.shape[1:], y0s, x0s, crops, np.arange(len(table)))
    return crops


def image_cells(
    pixels: np.ndarray,
    labels: np.ndarray | None,
    crop: int,
    opts: CellOptions,
    keys: dict[str, str],
    where: str,
    label_where: str = "labels",
) -> pd.DataFrame:
    """The cell table of one field held in memory, whatever it was read from: ``pixels`` (C, Y, X) are its
    segmentation channels, ``labels`` its nucleus label image (None: the built-in segmentation finds them); ``keys``
    the plate, well and field columns. A window of ``crop`` px is centred on each nucleus' intensity-weighted centroid
    (its geometric centre where it has no signal)."""
    img = segmentation_image(pixels)
    if img.size == 0:
        raise InputError(f"{where}: the field is empty (shape {img.shape}); expected an image with pixels")
    if labels is not None:
        if labels.shape != img.shape:
            raise InputError(f"{label_where}: shape {labels.shape}, the image is {img.shape}")
        if not np.issubdtype(labels.dtype, np.integer):
            raise InputError(f"{label_where}: dtype {labels.dtype}, expected integer labels")
    else:
        labels = segment_nuclei(img, opts.segment)
    if labels.max() == 0:
        log.info("%s: no nuclei", where)
        return counted(empty_table(), keys, 0)
    props = object_measures(labels, img, geometric=False)
    cy, cx = props["centroid_weighted-0"], props["centroid_weighted-1"]
    # a nucleus with zero signal has no weighted centroid: use its geometric centre
    bad = ~np.isfinite(cy) | ~np.isfinite(cx)
    if bad.any():
        cy, cx = np.where(bad, props["centroid-0"], cy), np.where(bad, props["centroid-1"], cx)
    shapes = {
        **{c: props[f"bbox-{k}"] for k, c in enumerate(("bbox_y0", "bbox_x0", "bbox_y1", "bbox_x1"))},
        "area": props["area"].astype(np.int64),
    }
    return centred_cells(keys, props["label"], cy, cx, shapes, crop, img.shape, opts.border)


def centred_cells(
    keys: dict[str, str],
    label: np.ndarray,
    cy: np.ndarray,
    cx: np.ndarray,
    shapes: dict[str, np.ndarray],
    crop: int,
    shape: tuple[int, int],
    border: str,
) -> pd.DataFrame:
    """The cell table of one field from its cells' centres (y, x in pixels): the crop window of each (``crop`` px,
    its corner at the rounded centre less half the crop), whether it leaves the field of ``shape``, the cells in
    position order (window rows top to bottom, then left to right). ``shapes``: further columns (bounding box, area)
    where the cells' source has them. ``border``: ``pad`` keeps cells whose window leaves the field, ``skip`` drops
    them."""
    if border not in ("pad", "skip"):
        raise ConfigError(f"unknown border mode {border!r}; expected pad or skip")
    y0 = np.round(cy).astype(np.int64) - crop // 2
    x0 = np.round(cx).astype(np.int64) - crop // 2
    h, w = shape
    df = pd.DataFrame(
        {
            **keys,
            "label": np.asarray(label).astype(np.int64),
            "centroid_y": np.asarray(cy, np.float64),
            "centroid_x": np.asarray(cx, np.float64),
            **shapes,
            "crop_y0": y0,
            "crop_x0": x0,
            "border": (y0 < 0) | (x0 < 0) | (y0 + crop > h) | (x0 + crop > w),
        }
    )
    found, dropped = len(df), ""
    if border == "skip":
        df = df[~df["border"]]
        dropped = "their crops leave the field (--border skip)" if len(df) < found else ""
    df = df.sort_values(["crop_y0", "crop_x0", "label"], kind="stable").reset_index(drop=True)
    return counted(df, keys, found, dropped)


def counted(table: pd.DataFrame, keys: dict[str, str], found: int, dropped: str = "") -> pd.DataFrame:
    """``table`` (a part's cells) saying in ``attrs`` which field it is (``keys``), how many cells were found there
    and why those not in it were dropped: the run counts cells found and embedded per field from it."""
    table.attrs.update(keys=dict(keys), found=int(found), dropped=dropped)
    return table


def empty_table() -> pd.DataFrame:
    return pd.DataFrame(
        {
            c: pd.Series(dtype=t)
            for c, t in zip(
                COLUMNS,
                [
                    object,
                    object,
                    object,
                    np.int64,
                    np.float64,
                    np.float64,
                    np.int64,
                    np.int64,
                    np.int64,
                    np.int64,
                    np.int64,
                    np.int64,
                    np.int64,
                    bool,
                ],
            )
        }
    )


class FieldCache:
    """The most recently decoded fields of this process (whole fields, selected channels), so that the blocks of one
    field decode it once, however many threads read them: a thread asking for a field another thread is decoding
    waits for that decode. At most :attr:`total_bytes` are kept (least recently used go first), so that every thread
    of a worker reading its own field keeps it; a field larger than :attr:`max_bytes` is not kept (its blocks read
    regions). ``decodes`` counts the reads from the store (benchmarks and tests check that each field is decoded
    once)."""

    def __init__(self, total_bytes: int = 1 << 30, max_bytes: int = 256 << 20) -> None:
        self.total_bytes, self.max_bytes = total_bytes, max_bytes
        self._data: OrderedDict[tuple, np.ndarray] = OrderedDict()
        self._loading: dict[tuple, threading.Event] = {}
        self._lock = threading.Lock()
        self.decodes = 0

    def get(self, key: tuple, nbytes: int, load: Callable[[], np.ndarray]) -> np.ndarray | None:
        """The whole field (C, Y, X) named ``key`` (``load()`` reads it on a miss), or None when its ``nbytes`` are too
        many to keep. ``key`` starts with a token naming the reader (a cell source, made anew by every command), so a
        plate rewritten between two runs is never served from memory."""
        if nbytes > self.max_bytes:
            return None
        while True:
            with self._lock:
                if key in self._data:
                    self._data.move_to_end(key)
                    return self._data[key]
                loading = self._loading.get(key)
                if loading is None:
                    self._loading[key] = threading.Event()
                    break
            loading.wait()  # another thread decodes it; then it is in the cache (or that decode failed: try again)
        try:
            data = load()
            with self._lock:
                self.decodes += 1
                self._data[key] = data
                while len(self._data) > 1 and sum(d.nbytes for d in self._data.values()) > self.total_bytes:
                    self._data.popitem(last=False)
            return data
        finally:
            with self._lock:
                self._loading.pop(key).set()

    def clear(self) -> None:
        with self._lock:
            self._data.clear()


#: the process's field cache (each Dask worker process has its own)
FIELDS = FieldCache()


def read_crops(
    plate: Plate,
    rows: pd.DataFrame,
    channels: Sequence[int],
    crop: int,
    dtype: np.dtype | None = None,
    cache_token: str | None = None,
) -> np.ndarray:
    """Raw crops (n, C, crop, crop) for table ``rows``: one region read per field, or, with a ``cache_token``, each
    field decoded once per process (see :data:`FIELDS`) unless it is too large to keep; zero padding at borders."""
    n = len(rows)
    out: np.ndarray | None = np.zeros((n, len(channels), crop, crop), dtype) if dtype is not None else None
    if n == 0:
        return out if out is not None else np.zeros((0, len(channels), crop, crop), np.uint16)
    y0s, x0s = rows["crop_y0"].to_numpy(), rows["crop_x0"].to_numpy()
    for (well, fld), idx in rows.groupby(["well", "field"], sort=False, observed=True).indices.items():
        ref = FieldRef(str(well), str(fld))
        ms = plate.image(ref)
        h, w = ms.array.shape[ms.axes.index("y")], ms.array.shape[ms.axes.index("x")]
        whole = None
        if cache_token is not None:
            key = (cache_token, plate.path, ref.well, ref.field, tuple(channels))
            nbytes = len(channels) * h * w * ms.array.dtype.itemsize
            whole = FIELDS.get(key, nbytes, lambda: plate.read(ref, channels))
        if whole is not None:
            ry0, rx0, region = 0, 0, whole
        else:
            ry0, rx0 = max(0, int(y0s[idx].min())), max(0, int(x0s[idx].min()))
            ry1, rx1 = min(h, int(y0s[idx].max()) + crop), min(w, int(x0s[idx].max()) + crop)
            region = plate.read(ref, channels, slice(ry0, ry1), slice(rx0, rx1))
        if out is None:
            out = np.zeros((n, len(channels), crop, crop), region.dtype)
        cut_crops(region, (ry0, rx0), (h, w), y0s[idx], x0s[idx], out, idx)
    return out


def cut_crops(
    region: np.ndarray,
    origin: tuple[int, int],
    shape: tuple[int, int],
    y0s: np.ndarray,
    x0s: np.ndarray,
    out: np.ndarray,
    idx: Sequence[int],
) -> None:
    """Cut the windows at corners (``y0s``, ``x0s``) of a field of ``shape`` (y, x) into ``out[idx]`` (n, C, S, S,
    zero where a window leaves the field), from ``region`` (C, y, x): the part of the field whose corner is at
    ``origin``, which holds every window's pixels inside the field. ``out`` may hold anything before: every pixel of
    ``out[idx]`` is written.

    The windows that lie inside the field are gathered at once, channel by channel, from a strided view of every
    window of the region (no Python loop per cell; 1.5x the per-cell loop on a 2048 px field of 4,096 cells); the few
    that leave the field are cut one by one and padded with zeros."""
    crop = out.shape[-1]
    (ry0, rx0), (h, w) = origin, shape
    y0s, x0s = np.asarray(y0s, np.int64), np.asarray(x0s, np.int64)
    idx = np.asarray(idx, np.intp)
    inside = (y0s >= 0) & (x0s >= 0) & (y0s + crop <= h) & (x0s + crop <= w)
    if inside.all():
        ys, xs, rows = y0s - ry0, x0s - rx0, idx
    else:
        ys, xs, rows = y0s[inside] - ry0, x0s[inside] - rx0, idx[inside]
    if len(rows):
        windows = sliding_window_view(region, (crop, crop), axis=(1, 2))  # (C, y, x, S, S), no copy
        whole = len(rows) == len(out) and bool(np.all(rows == np.arange(len(out))))
        for c in range(region.shape[0]):
            if whole:  # every row of out, in order: written in place
                out[:, c] = windows[c, ys, xs]
            else:
                out[rows, c] = windows[c, ys, xs]
    for i, y0, x0 in zip(idx[~inside], y0s[~inside], x0s[~inside]):
        y0, x0 = int(y0), int(x0)
        out[i] = 0
        sy0, sx0 = max(y0, 0), max(x0, 0)
        sy1, sx1 = min(y0 + crop, h), min(x0 + crop, w)
        if sy1 <= sy0 or sx1 <= sx0:
            continue
        out[i, :, sy0 - y0 : sy1 - y0, sx0 - x0 : sx1 - x0] = region[:, sy0 - ry0 : sy1 - ry0, sx0 - rx0 : sx1 - rx0]
