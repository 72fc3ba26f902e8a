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


class NpySource:
    """A kind of source defined outside scdino: the crops of one ``.npy`` array (n, C, S, S), cell ``i`` named
    ``npy/i``; what ``run`` needs of a source and nothing else."""

    kind = "npy"
    accepts = "a .npy array of crops (n, C, S, S)"
    ignores = ("crop_size", "crop_um", "wells", "labels", "segment_channel")
    catch_all = False
    read_columns = ("i",)
    read_unit: tuple[str, ...] = ()
    parts = [None]

    def __init__(self, path, opts=None) -> None:
        self.path = path
        self.array = np.load(path, mmap_mode="r")
        n, c, s, _ = self.array.shape
        self.channels, self.channel_names = tuple(range(c)), tuple(f"ch{i}" for i in range(c))
        self.available_channels, self.crop_size, self.dtype = self.channel_names, s, self.array.dtype
        self.capabilities = ()

    @classmethod
    def claims(cls, path: str) -> bool:
        return str(path).endswith(".npy")

    @staticmethod
    def cell_ids(table):
        import pandas as pd

        return pd.Index([f"npy/{i}" for i in table["i"]], dtype=object)

    @staticmethod
    def title(row) -> str:
        return f"crop {row['i']}"

    def identity(self) -> dict:
        return {"npy": str(self.path), "shape": list(self.array.shape)}

    def describe(self) -> dict:
        return {"kind": self.kind, "capabilities": [], "path": str(self.path)}

    def cells_of(self, part=None):
        import pandas as pd

        return pd.DataFrame({"i": np.arange(len(self.array))})

    def find_cells(self, client=None, progress=None):
        return self.cells_of()

    def combine(self, parts):
        return parts[0]

    def read(self, rows) -> np.ndarray:
        return np.asarray(self.array[rows["i"].to_numpy()])


@pytest.fixture()
def npy_kind():
    from scdino.cells.base import register, unregister

    register(NpySource)  # what a module of scdino.cells does with @register when it is imported
    yield NpySource
    unregister(NpySource)


def test_a_source_kind_registered_outside_the_package_is_run_like_a_crop_store(npy_kind, tmp_path):
    import anndata as ad

    rng = np.random.default_rng(1)
    raw = rng.integers(0, 4000, size=(10, 2, 24, 24)).astype(np.uint16)
    np.save(tmp_path / "crops.npy", raw)
    root = write_class_tiffs(tmp_path / "f", raw, ["a"] * 10)
    ingest(root, tmp_path / "c.zarr", channels=["ch0", "ch1"], progress=False)
    for name, src in (("npy", tmp_path / "crops.npy"), ("store", tmp_path / "c.zarr")):
        run(RunConfig(plate=str(src), out=str(tmp_path / f"{name}.zarr"), model=MODEL, input_size=32, progress=False,
                      chunk_cells=4))  # fmt: skip
    a, b = ad.read_zarr(tmp_path / "npy.zarr"), ad.read_zarr(tmp_path / "store.zarr")
    assert list(a.obs_names) == [f"npy/{i}" for i in range(10)]
    order = np.argsort([int(p.split("/")[-1][1:4]) for p in b.obs["path"]])  # a/c000.tif ... a/c009.tif
    np.testing.assert_array_equal(a.obsm["X_scdino"], b.obsm["X_scdino"][order])
    assert dict(a.uns["scdino"]["source"])["kind"] == "npy"
    _, ids, crops = _attention(tmp_path / "npy.zarr", tmp_path / "att", cells=["npy/7"])
    assert ids == ["npy/7"]
    np.testing.assert_array_equal(crops[0], raw[7])


def test_a_new_module_in_the_cells_package_registers_its_kind_with_no_list_edited(tmp_path, monkeypatch):
    """A kind of source is one new module of scdino.cells: every module of the package is imported before the first
    question, so its @register runs; nothing else names it."""
    import scdino.cells
    from scdino.cells import base, source

    extra = tmp_path / "more"
    extra.mkdir()
    (extra / "zz_kind.py").write_text(
        "from scdino.cells.base import register\n\n\n"
        "@register\nclass ZzSource:\n"
        "    kind, accepts, catch_all = 'zz', 'a .zz file', False\n\n"
        "    @classmethod\n    def claims(cls, path):\n        return str(path).endswith('.zz')\n"
    )
    monkeypatch.setattr(scdino.cells, "__path__", [*scdino.cells.__path__, str(extra)])
    monkeypatch.setattr(source, "_LOADED", [])
    monkeypatch.setattr(base, "SOURCES", list(base.SOURCES))  # the registry as it was, after the test
    assert source.source_type("x.zz").kind == "zz"
    kinds = [k.kind for k in source.registered()]
    assert kinds[-1] == "plate" and {"zz", "crop_store", "loaddata"} <= set(kinds)  # the catch-all asked last
