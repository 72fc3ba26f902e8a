"""Cell identity lives on the source protocol (``cell_ids``, ``title``, per-source capabilities): ``attention`` works
on every kind of source and on a run's output, and a kind registered from outside ``scdino.cells.source`` is used by
``run`` like the built-in ones."""

from __future__ import annotations

import re

import numpy as np
import pytest
import tifffile
from test_loaddata import write_loaddata

from conftest import write_class_tiffs
from scdino.cells.source import CropStoreSource, open_source, source_type
from scdino.engine.attention import attention_command
from scdino.engine.ingest import ingest
from scdino.engine.pipeline import RunConfig, run

MODEL = "random:vit_test16"
FIELD_CELL = re.compile(r"^(A/1/[01]|B/2/0)/\d+$")  # the tiny plate's wells and fields, a nucleus label


def _attention(source, out, **kw):
    r = attention_command(str(source), MODEL, str(out), input_size=32, **kw)
    npz = np.load(out / "attention.npz")
    return r, [str(i) for i in npz["ids"]], npz["crops"]


def _centre_is_nucleus(crops: np.ndarray) -> bool:
    """Each crop is centred on one of the tiny plate's nuclei: its centre is a disk 800+ counts over a ~100 background
    (conftest.blob_field)."""
    c = crops.shape[-1] // 2
    return bool((crops[:, 0, c, c] > 600).all())


def test_attention_on_a_plate_given_directly(tiny_plate, tmp_path):
    r, ids, crops = _attention(tiny_plate, tmp_path / "a", per_class=3)
    assert r["cells"] == 3 and len(ids) == 3 and all(FIELD_CELL.match(i) for i in ids), ids
    assert _centre_is_nucleus(crops)
    _, again, same = _attention(tiny_plate, tmp_path / "b", cells=[ids[1]])
    assert again == [ids[1]]
    np.testing.assert_array_equal(same[0], crops[1])


def test_attention_on_a_loaddata_csv_names_and_cuts_cells_as_its_plate(tiny_plate, tmp_path):
    csv = write_loaddata(tiny_plate, tmp_path / "screen")
    _, plate_ids, plate_crops = _attention(tiny_plate, tmp_path / "p", per_class=4, seed=3)
    _, ids, crops = _attention(csv, tmp_path / "c", per_class=4, seed=3)
    assert ids == plate_ids and all(FIELD_CELL.match(i) for i in ids)
    np.testing.assert_array_equal(crops, plate_crops)  # the TIFFs hold the plate's pixels


def test_attention_on_a_crop_store_shows_the_stored_files(tmp_path):
    rng = np.random.default_rng(0)
    raw = rng.integers(0, 4000, size=(6, 2, 24, 24)).astype(np.uint16)
    root = write_class_tiffs(tmp_path / "f", raw, ["a", "b"] * 3)
    ingest(root, tmp_path / "c.zarr", channels=["X", "Y"], progress=False)
    r, ids, crops = _attention(tmp_path / "c.zarr", tmp_path / "o", per_class=1)
    assert r["cells"] == 2 and [i.split("/")[0] for i in ids] == ["a", "b"]  # one per class, classes in order
    for i, crop in zip(ids, crops):
        np.testing.assert_array_equal(crop, np.moveaxis(tifffile.imread(root / i), -1, 0))


def test_attention_on_a_run_output_reads_the_cells_by_their_obs_names(tiny_plate, tmp_path):
    import anndata as ad

    out = tmp_path / "cells.zarr"
    run(RunConfig(plate=tiny_plate, out=str(out), model=MODEL, input_size=32, progress=False))
    names = list(ad.read_zarr(out).obs_names)
    assert names and all(FIELD_CELL.match(n) for n in names)
    _, ids, crops = _attention(out, tmp_path / "o", cells=[names[-1], names[0]])
    assert sorted(ids) == sorted([names[0], names[-1]])
    _, direct, direct_crops = _attention(tiny_plate, tmp_path / "d", cells=[names[0], names[-1]])
    assert ids == direct
    np.testing.assert_array_equal(crops, direct_crops)


def test_capabilities_belong_to_each_source_not_to_its_kind(tmp_path):
    raw = np.zeros((4, 1, 16, 16), np.uint16)
    labelled = write_class_tiffs(tmp_path / "l", raw, ["a", "b", "a", "b"])
    ingest(labelled, tmp_path / "l.zarr", progress=False)
    assert "classes" in open_source(tmp_path / "l.zarr").capabilities
    assert source_type(tmp_path / "l.zarr") is CropStoreSource
    assert not hasattr(CropStoreSource, "capabilities")  # nothing to read at the class: it differs per store


@pytest.mark.parametrize("kind", ["plate", "loaddata", "crop_store"])
def test_every_kind_names_and_titles_its_cells(kind):
    from scdino.cells.source import source_kind

    cls = source_kind(kind)
    assert callable(cls.cell_ids) and callable(cls.title) and isinstance(cls.catch_all, bool)
