"""Pixels and labels are checked where they are read, and no cell goes without a word: non-finite pixels and negative
labels are refused naming the image, a field whose cells were all dropped is named, and every field's cells found and
embedded are counted in ``uns``."""

from __future__ import annotations

import logging

import anndata as ad
import numpy as np
import pytest
import tifffile
import zarr

from conftest import blob_field, make_tiny_plate
from scdino.cells.options import CellOptions
from scdino.cells.pixels import check_finite, check_labels
from scdino.engine.pipeline import RunConfig, run
from scdino.engine.sample import FieldImage, write_plate
from scdino.errors import InputError


def test_non_finite_pixels_are_counted_per_channel_and_named():
    px = np.ones((3, 4, 5), np.float32)
    px[1, 0, :3] = np.nan
    px[1, 2, 2] = -np.inf
    px[2, 3, 4] = np.inf
    with pytest.raises(InputError) as err:
        check_finite(px, "p.zarr/A/1/0", ["DAPI", "GFP", "RFP"])
    # the first channel with any: GFP, 3 NaN + 1 -inf of 20 pixels; RFP has some too
    assert "p.zarr/A/1/0: channel GFP has 4 non-finite pixels (NaN, -inf) of 20 (2 channels have some)" in str(
        err.value
    )
    check_finite(np.ones((1, 2, 2), np.uint16), "x", ["a"])  # integers cannot be non-finite
    check_finite(np.ones((1, 2, 2), np.float64), "x", lambda: pytest.fail("names read without a failure"))


def test_negative_and_float_labels_are_refused():
    lab = np.zeros((4, 4), np.int32)
    lab[1, 1], lab[2, :2] = 3, -2
    with pytest.raises(InputError, match=r"f/labels/n: 2 pixels hold negative labels \(lowest -2\)"):
        check_labels(lab, "f/labels/n")
    with pytest.raises(InputError, match="labels of type float32; expected an integer label image"):
        check_labels(lab.astype(np.float32), "f")
    check_labels(np.abs(lab).astype(np.uint16), "f")


def _edge_plate(path):
    """Well A/1: field 0 with 3 nuclei in the middle and 1 at the edge; field 1 with 2 nuclei, both at the edge."""
    rng = np.random.default_rng(3)
    inner = blob_field(rng, [(48, 40), (48, 64), (48, 90), (4, 4)])
    edge = blob_field(rng, [(5, 6), (90, 122)])
    return write_plate(path, {"A/1": [inner, edge]}, ["DAPI", "GFP"], ngff="0.5", name="edge")


def test_cells_found_and_embedded_per_field_and_a_field_whose_cells_all_went_is_named(tmp_path, caplog):
    plate = _edge_plate(tmp_path / "edge.zarr")
    opts = CellOptions(labels="nuclei", crop_size=32, border="skip")
    cfg = RunConfig(plate=plate, out=str(tmp_path / "o.zarr"), model="random:vit_test16", cells=opts, progress=False)
    with caplog.at_level(logging.WARNING):
        run(cfg)
    assert "A/1/1: all 2 cells found there were dropped: their crops leave the field (--border skip)" in caplog.text
    a = ad.read_zarr(tmp_path / "o.zarr")
    f = {k: list(v) for k, v in a.uns["scdino"]["fields"].items()}
    # counted by hand from the centres above: a 32 px window around (4, 4), (5, 6) or (90, 122) leaves the field
    assert f["well"] == ["A/1", "A/1"] and f["field"] == ["0", "1"]
    assert f["found"] == [4, 2] and f["embedded"] == [3, 0]
    assert a.n_obs == 3 and list(a.obs["field"].astype(str)) == ["0"] * 3


def test_a_float_loaddata_image_with_nan_is_named_by_file(tmp_path):
    from test_loaddata import write_loaddata

    plate = make_tiny_plate(tmp_path / "tiny.zarr")
    csv = write_loaddata(plate, tmp_path / "screen", ("A/1",))
    bad = tmp_path / "screen" / "images" / "A01_s1_GFP.tif"
    img = tifffile.imread(bad).astype(np.float32)
    img[5, 5] = np.nan
    tifffile.imwrite(bad, img)
    for other in (tmp_path / "screen" / "images").glob("*.tif"):  # one pixel type for the whole screen
        if other != bad:
            tifffile.imwrite(other, tifffile.imread(other).astype(np.float32))
    out = str(tmp_path / "o.zarr")
    cfg = RunConfig(plate=str(csv), out=out, model="random:vit_test16", cells=CellOptions(crop_size=16))
    with pytest.raises(InputError, match=r"A01_s1_GFP.tif \(well A/1, site 1\): channel GFP has 1 non-finite pixels"):
        run(cfg)


def test_a_float_crop_store_with_nan_names_the_crop(tmp_path):
    from conftest import write_class_tiffs
    from scdino.engine.ingest import ingest

    crops = np.random.default_rng(0).uniform(0, 1, size=(4, 2, 16, 16)).astype(np.float32)
    write_class_tiffs(tmp_path / "t", crops, ["a", "a", "b", "b"])
    ingest(tmp_path / "t", tmp_path / "s.zarr", channels=["DAPI", "GFP"], progress=False)
    arr = zarr.open_group(str(tmp_path / "s.zarr"), mode="a")["crops"]
    block = arr[...]
    block[2, 1, 3, 3] = np.inf
    arr[...] = block
    cfg = RunConfig(plate=str(tmp_path / "s.zarr"), out=str(tmp_path / "o.zarr"), model="random:vit_test16")
    with pytest.raises(InputError, match=r"s.zarr: crop 2: channel GFP has 1 non-finite pixels \(\+inf\)"):
        run(cfg)
    # and ingest refuses such a crop where it reads it, naming the file
    crops[1, 0, 0, 0] = np.nan
    write_class_tiffs(tmp_path / "t2", crops, ["a", "a", "b", "b"])
    with pytest.raises(InputError, match=r"a/c001.tif: channel DAPI has 1 non-finite pixels \(NaN\)"):
        ingest(tmp_path / "t2", tmp_path / "s2.zarr", channels=["DAPI", "GFP"], progress=False)
    assert not (tmp_path / "s2.zarr").exists()


def test_signed_labels_keep_their_sign_when_a_plate_is_written(tmp_path):
    img = np.zeros((1, 8, 8), np.uint16)
    lab = np.zeros((8, 8), np.int32)
    lab[0, 0] = -1
    path = write_plate(tmp_path / "p.zarr", {"A/1": [FieldImage(img, {"n": lab})]}, ["DAPI"])
    from scdino.cells.plate import FieldRef, Plate

    with pytest.raises(InputError, match="A/1/0/labels/n: 1 pixels hold negative labels"):
        Plate(path).labels(FieldRef("A/1", "0"), "n")
