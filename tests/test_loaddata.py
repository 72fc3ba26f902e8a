"""A CellProfiler LoadData CSV as a cell source: the sample plates' own images written as one TIFF per channel per site
give the same cells, crops and embeddings as the OME-Zarr plate they came from."""

from __future__ import annotations

import os
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import tifffile

from scdino.cells.loaddata import LoadDataSource
from scdino.cells.options import CellOptions
from scdino.cells.plate import Plate
from scdino.cells.source import PlateSource, open_source
from scdino.engine.pipeline import RunConfig, run
from scdino.errors import InputError

WELLS = ("A/1", "A/2")


def write_loaddata(plate_path: str, root: Path, wells=None) -> Path:
    """Every field of the plate as ``images/<well>_s<field>_<channel>.tif`` and a LoadData CSV listing them, written
    as CellProfiler writes it: wells as ``A01``, relative ``PathName`` folders."""
    plate = Plate(plate_path)
    (root / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for ref in plate.fields(wells):
        names = plate.channel_names(ref)
        pixels = plate.read(ref, list(range(len(names))))
        r, c = ref.well.split("/")
        row = {"Metadata_Plate": plate.name, "Metadata_Well": f"{r}{int(c):02d}", "Metadata_Site": ref.field}
        for name, plane in zip(names, pixels):
            f = f"{r}{int(c):02d}_s{ref.field}_{name}.tif"
            tifffile.imwrite(root / "images" / f, plane)
            row[f"FileName_{name}"], row[f"PathName_{name}"] = f, "images"
        rows.append(row)
    pd.DataFrame(rows).to_csv(root / "load_data.csv", index=False)
    return root / "load_data.csv"


@pytest.mark.slow  # two runs: 35 s on the shared 2-core machine
def test_a_loaddata_csv_embeds_exactly_as_its_plate(scratch_plate, tmp_path, client):
    csv = write_loaddata(scratch_plate, tmp_path / "screen", WELLS)
    opts = CellOptions(segment_channel="H3342", crop_size=24, wells=WELLS)
    outs = {}
    for name, src in (("plate", scratch_plate), ("csv", str(csv))):
        outs[name] = tmp_path / f"{name}.zarr"
        run(RunConfig(plate=src, out=str(outs[name]), model="random:vit_test8", cells=opts, input_size=32,
                      chunk_cells=64, progress=False))  # fmt: skip
    a, b = (ad.read_zarr(outs[k]) for k in ("plate", "csv"))
    assert a.n_obs == b.n_obs > 50
    np.testing.assert_array_equal(b.obsm["X_scdino"], a.obsm["X_scdino"])  # bit for bit
    assert list(b.obs_names) == list(a.obs_names)  # A/1/0/17: well, site, nucleus
    cols = ["plate", "well", "field", "label", "centroid_y", "centroid_x", "bbox_y0", "bbox_x1", "area", "crop_y0"]
    pd.testing.assert_frame_equal(
        b.obs[cols].astype({c: str for c in ("plate", "well", "field")}).reset_index(drop=True),
        a.obs[cols].astype({c: str for c in ("plate", "well", "field")}).reset_index(drop=True),
    )
    assert dict(b.uns["scdino"]["source"])["kind"] == "loaddata"
    assert list(a.uns["scdino"]["source"]["capabilities"]) == ["wells", "label_images"]


def objects_csv(table: pd.DataFrame, path: Path, by: str = "ImageNumber", sites=None) -> Path:
    """A CellProfiler object table of the cells in ``table`` (their centres, boxes and areas), keyed ``by``
    ImageNumber (the LoadData CSV's row, from ``sites``: (well, field) in CSV order) or by Metadata keys."""
    df = pd.DataFrame(
        {
            "ObjectNumber": table["label"],
            "Nuclei_Location_Center_X": table["centroid_x"],
            "Nuclei_Location_Center_Y": table["centroid_y"],
            "Nuclei_AreaShape_BoundingBoxMinimum_X": table["bbox_x0"],
            "Nuclei_AreaShape_BoundingBoxMinimum_Y": table["bbox_y0"],
            "Nuclei_AreaShape_BoundingBoxMaximum_X": table["bbox_x1"],
            "Nuclei_AreaShape_BoundingBoxMaximum_Y": table["bbox_y1"],
            "Nuclei_AreaShape_Area": table["area"],
        }
    )
    if by == "ImageNumber":
        df.insert(0, "ImageNumber", [sites.index((w, f)) + 1 for w, f in zip(table["well"], table["field"])])
    else:
        r_c = table["well"].str.split("/")
        df.insert(0, "Metadata_Well", [f"{r}{c}" for r, c in r_c])  # A1: another form of the same well
        df.insert(1, "Metadata_Site", table["field"].astype(str).str.zfill(2))  # 00: another form of site 0
    df = df.sample(frac=1.0, random_state=0)  # CellProfiler's row order is not the position order
    df.to_csv(path, index=False)
    return path


@pytest.mark.parametrize("by", ["ImageNumber", "Metadata"])
def test_an_object_table_gives_the_crops_of_the_plate_labels(scratch_plate, tmp_path, by):
    wells = ("A/3", "A/4", "A/5")
    csv = write_loaddata(scratch_plate, tmp_path, wells)
    plate = PlateSource(scratch_plate, CellOptions(labels="nuclei", crop_size=20, wells=wells))
    table = plate.find_cells()
    sites = [(f.well, f.field) for f in plate.fields]
    objects = objects_csv(table, tmp_path / "nuclei.csv", by, sites)
    source = open_source(csv, CellOptions(labels=objects.name, crop_size=20))  # found beside the LoadData CSV
    assert isinstance(source, LoadDataSource)
    got = source.find_cells()
    pd.testing.assert_frame_equal(got, table)  # the same cells, columns and order
    np.testing.assert_array_equal(source.read(got), plate.read(table))


def test_bad_loaddata_inputs_say_which_file_and_what_to_do(scratch_plate, tmp_path):
    csv = write_loaddata(scratch_plate, tmp_path, ("A/1",))
    df = pd.read_csv(csv, dtype=str)
    df.drop(columns="Metadata_Site").to_csv(tmp_path / "no_site.csv", index=False)
    with pytest.raises(InputError, match=r"no_site.csv: no column Metadata_Site .*LoadData layout"):
        open_source(tmp_path / "no_site.csv")
    df.drop(columns="PathName_oblique").to_csv(tmp_path / "no_path.csv", index=False)
    with pytest.raises(InputError, match=r"no_path.csv: no column PathName_oblique"):
        open_source(tmp_path / "no_path.csv")
    os.remove(tmp_path / "images" / "A01_s0_oblique.tif")
    with pytest.raises(InputError, match=r"image set 1 \(well A/1, site 0\): channel oblique's file .*A01_s0_oblique"):
        open_source(csv)
    with pytest.raises(InputError, match=r"notes.txt: not a cell source .*LoadData CSV"):
        (tmp_path / "notes.txt").write_text("x")
        open_source(tmp_path / "notes.txt")


def test_object_rows_of_no_image_and_missing_centres_are_refused(scratch_plate, tmp_path):
    csv = write_loaddata(scratch_plate, tmp_path, ("A/1",))
    pd.DataFrame({"ImageNumber": [1, 2], "Location_Center_X": [5.0, 6.0], "Location_Center_Y": [5.0, 6.0]}).to_csv(
        tmp_path / "far.csv", index=False
    )
    with pytest.raises(InputError, match=r"far.csv: 1 object rows match no image set .*row 2"):
        open_source(csv, CellOptions(labels=str(tmp_path / "far.csv")))
    pd.DataFrame({"ImageNumber": [1], "Center_X": [5.0]}).to_csv(tmp_path / "nocentre.csv", index=False)
    with pytest.raises(InputError, match=r"nocentre.csv: no cell centre columns \(Nuclei_Location_Center_X/Y"):
        open_source(csv, CellOptions(labels=str(tmp_path / "nocentre.csv")))
    with pytest.raises(InputError, match=r"missing.csv: no such CSV file .*object table"):
        open_source(csv, CellOptions(labels="missing.csv"))


def test_evaluate_asks_the_source_for_classes(scratch_plate, tmp_path):
    from scdino.engine.evaluate import EvalSettings, compute_grid

    csv = write_loaddata(scratch_plate, tmp_path, ("A/1",))
    with pytest.raises(InputError, match="evaluate needs cells with a class label \\(loaddata has none\\)"):
        compute_grid(str(csv), ["random:vit_test8"], [], tmp_path / "rep", EvalSettings())
