import os

import numpy as np
import pytest
import zarr

from conftest import blob_field, make_tiny_plate
from scdino.cells.options import CellOptions, SegmentParams
from scdino.cells.plate import FieldRef, Plate, resolve_channels
from scdino.cells.segment import segment_nuclei
from scdino.cells.table import field_cells, read_crops
from scdino.errors import ConfigError, InputError


@pytest.mark.parametrize("ngff,zarr_format", [("0.4", 2), ("0.5", 3)])
def test_reads_ngff_04_and_05(tmp_path, ngff, zarr_format):
    path = make_tiny_plate(tmp_path / "p.zarr", ngff=ngff, n_channels=3)
    plate = Plate(path)
    assert plate.zarr_format == zarr_format and plate.version == ngff
    assert plate.wells == ["A/1", "B/2"]
    refs = plate.fields()
    assert [r.path for r in refs] == ["A/1/0", "A/1/1", "B/2/0"]
    assert plate.channel_names(refs[0]) == ["DAPI", "GFP", "RFP"]
    assert plate.image(refs[0]).pixel_size == (0.5, 0.5)
    assert plate.label_names(refs[0]) == ["nuclei"]
    img = plate.read(refs[0], [2, 0])
    assert img.shape == (2, 96, 128) and img.dtype == np.uint16
    full = plate.read(refs[0], [0, 1, 2])
    np.testing.assert_array_equal(img, full[[2, 0]])
    assert plate.labels(refs[0], "nuclei").max() == 4


def test_channel_selection_by_name_and_index():
    names = ["DAPI", "GFP", "RFP"]
    assert resolve_channels(names, ["RFP", "0"], "x") == [2, 0]
    assert resolve_channels(names, None, "x") == [0, 1, 2]
    with pytest.raises(ConfigError, match="x: no channel 'CY5'; channels are DAPI, GFP, RFP"):
        resolve_channels(names, ["CY5"], "x")


def test_not_a_plate(tmp_path):
    with pytest.raises(InputError, match="no zarr group"):
        Plate(tmp_path / "nothing.zarr")
    zarr.open_group(tmp_path / "img.zarr", mode="w").attrs["multiscales"] = [{"datasets": [{"path": "0"}]}]
    with pytest.raises(InputError, match="not an OME-Zarr HCS plate \\(an image"):
        Plate(tmp_path / "img.zarr")


def test_missing_labels_are_named(tiny_plate):
    plate = Plate(tiny_plate)
    with pytest.raises(InputError, match="A/1/0: no label image 'cells' \\(labels: nuclei\\).*--segment-channel"):
        plate.labels(FieldRef("A/1", "0"), "cells")


def test_unreadable_chunk_names_the_field(tmp_path):
    path = make_tiny_plate(tmp_path / "p.zarr")
    level0 = Plate(path).image(FieldRef("A/1", "1")).array.path  # "A/1/1/s0"
    chunks = [os.path.join(dp, f) for dp, _, fs in os.walk(os.path.join(path, level0)) for f in fs if f != "zarr.json"]
    assert chunks
    with open(chunks[0], "wb") as f:
        f.write(b"garbage, not a chunk")
    plate = Plate(path)
    with pytest.raises(InputError, match=r"p.zarr/A/1/1: a chunk cannot be read .* damaged"):
        field_cells(plate, FieldRef("A/1", "1"), CellOptions(labels="nuclei", crop_size=16))


def test_segmentation_splits_touching_nuclei_and_filters_sizes():
    rng = np.random.default_rng(0)
    f = blob_field(rng, [(40, 40), (40, 51), (80, 100)], shape=(120, 140), radius=7, n_channels=1)
    img = f.image[0].copy()
    img[5:7, 5:7] += 2000  # a 4-pixel speck: below min_area
    lab = segment_nuclei(img, SegmentParams(sigma=1.0, min_distance=5, min_area=30))
    assert lab.max() == 3
    truth = f.labels["nuclei"]
    for i in (1, 2, 3):
        ids, counts = np.unique(lab[truth == i], return_counts=True)
        assert ids[np.argmax(counts)] > 0 and counts.max() > 0.8 * (truth == i).sum()
    assert len({int(np.bincount(lab[truth == i]).argmax()) for i in (1, 2, 3)}) == 3
    assert segment_nuclei(np.full((30, 30), 7, np.uint16)).max() == 0


def test_cell_table_is_mass_centred_with_border_flags(tiny_plate):
    plate = Plate(tiny_plate)
    ref = FieldRef("A/1", "0")
    df = field_cells(plate, ref, CellOptions(labels="nuclei", crop_size=44))
    # ordered by position (top to bottom, then left to right): nuclei at y 20, 30, 50, 70
    assert list(df["label"]) == [1, 4, 2, 3]
    img = plate.read(ref, [0])[0].astype(float)
    lab = plate.labels(ref, "nuclei")
    for _, row in df.iterrows():
        ys, xs = np.nonzero(lab == row["label"])
        w = img[ys, xs]
        assert row["centroid_y"] == pytest.approx((ys * w).sum() / w.sum())
        assert row["centroid_x"] == pytest.approx((xs * w).sum() / w.sum())
        assert row["crop_y0"] == round(row["centroid_y"]) - 22
        assert row["crop_x0"] == round(row["centroid_x"]) - 22
    # field 96 x 128; nuclei at (20, 20) and (30, 110) have windows leaving it
    assert list(df["border"]) == [True, True, False, False]
    skipped = field_cells(plate, ref, CellOptions(labels="nuclei", crop_size=44, border="skip"))
    assert list(skipped["label"]) == [2, 3]


def test_crops_equal_direct_slicing_with_zero_padding(tiny_plate):
    plate = Plate(tiny_plate)
    opts = CellOptions(labels="nuclei", crop_size=40)
    rows = [field_cells(plate, r, opts) for r in plate.fields()]
    import pandas as pd

    table = pd.concat(rows, ignore_index=True)
    crops = read_crops(plate, table, [1, 0], 40)
    assert crops.shape == (len(table), 2, 40, 40) and crops.dtype == np.uint16
    for i, row in table.iterrows():
        img = plate.read(FieldRef(row["well"], row["field"]), [1, 0])
        pad = np.pad(img, ((0, 0), (40, 40), (40, 40)))
        y0, x0 = row["crop_y0"] + 40, row["crop_x0"] + 40
        np.testing.assert_array_equal(crops[i], pad[:, y0 : y0 + 40, x0 : x0 + 40])
    assert table["border"].any()


def test_crop_um_uses_the_pixel_size(tiny_plate, scratch_plate):
    df = field_cells(Plate(tiny_plate), FieldRef("A/1", "0"), CellOptions(labels="nuclei", crop_um=10.0))
    assert (df["crop_y0"] == np.round(df["centroid_y"]).astype(int) - 10).all()  # 10 um / 0.5 um = 20 px
    plate = Plate(scratch_plate)
    assert plate.image(plate.fields()[0]).pixel_size == (0.619, 0.619)


def test_object_measures_equal_regionprops():
    from skimage.measure import regionprops_table

    from scdino.cells.table import object_measures

    rng = np.random.default_rng(0)
    labels = np.zeros((60, 80), np.int64)
    labels[0:10, 0:7] = 3  # touches two borders
    labels[20:31, 40:52] = 1000  # sparse, large label ids
    labels[45:60, 70:80] = 7  # touches the other two
    labels[5:8, 30:33] = 12  # no signal at all: no weighted centroid
    labels[35:40, 5:25] = 12  # ...and in two pieces
    img = rng.uniform(0, 1000, labels.shape).astype(np.float32)
    img[5:8, 30:33] = 0
    img[35:40, 5:25] = 0
    ours = object_measures(labels, img)
    ref = regionprops_table(
        labels.astype(np.int32),
        intensity_image=img,
        properties=("label", "centroid", "centroid_weighted", "bbox", "area"),
    )
    assert sorted(ours) == sorted(ref)
    for key in ref:
        np.testing.assert_allclose(ours[key], ref[key], rtol=0, atol=1e-9, err_msg=key, equal_nan=True)
    assert np.isnan(ours["centroid_weighted-0"][list(ours["label"]).index(12)])
    # geometric=False: the plain centroids only where some object has no signal (here label 12), the same values
    lean = object_measures(labels, img, geometric=False)
    assert all(np.array_equal(lean[k], ours[k], equal_nan=True) for k in ours)
    lit = img.copy()
    lit[labels == 12] = 1.0
    assert "centroid-0" not in object_measures(labels, lit, geometric=False)
    empty = object_measures(np.zeros((5, 5), np.int32), np.ones((5, 5)))
    assert all(len(v) == 0 for v in empty.values())
    for dtype in (np.uint16, np.uint32, np.int32):  # other label dtypes give the same objects
        same = object_measures(labels.astype(dtype), img)
        assert all(np.array_equal(same[k], ours[k], equal_nan=True) for k in ours)
    marked = labels.copy()
    marked[50:55, 0:5] = -1  # a negative "ignore" mark is not an object, as for regionprops
    assert list(object_measures(marked, img)["label"]) == list(ours["label"])


def test_wells_in_every_form_plate_maps_use(tmp_path):
    """--wells A1, A01, a/01 and A/1 select the same well (plate maps write A01 or A1; the plate's path is A/1)."""
    plate = Plate(make_tiny_plate(tmp_path / "p.zarr"))
    want = ["A/1/0", "A/1/1"]
    for form in ("A/1", "A1", "A01", "a/01", " A1 "):
        assert [r.path for r in plate.fields([form])] == want, form
    assert [r.path for r in plate.fields(["b02", "A1"])] == ["A/1/0", "A/1/1", "B/2/0"]  # in plate order
    with pytest.raises(ConfigError, match="no well C7; wells are A/1, B/2"):
        plate.fields(["C7"])
