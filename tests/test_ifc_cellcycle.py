"""The Jurkat cell-cycle cells shipped for the comparison, and the label-free model trained on them
(``--model ifc-cellcycle``): it runs through scdino-engine run, scdino-export onnx and quantize unchanged."""

from __future__ import annotations

import json
from pathlib import Path

import anndata as ad
import numpy as np
import pytest

from scdino.cells.cropstore import CropStore
from scdino.cells.options import CellOptions
from scdino.data import packaged_model_path
from scdino.engine.pipeline import RunConfig, run
from scdino.errors import ConfigError
from scdino.models import load_model

DATA = Path(__file__).parent.parent / "benchmarks" / "data" / "jurkat_cellcycle"


def test_the_cells_are_split_once_stratified_and_disjoint():
    train, held = CropStore(DATA / "train.zarr"), CropStore(DATA / "holdout.zarr")
    assert train.channels == held.channels == ["BF", "DNA", "DF"] and train.crop_size == 40
    t, h = train.table(), held.table()
    assert len(t) == 2064 and len(h) == 516
    assert not set(t["path"]) & set(h["path"])  # no cell in both
    split = json.loads((DATA / "split.json").read_text())
    for name, table in (("train", t), ("holdout", h)):
        assert table["class"].astype(str).value_counts().to_dict() == split["stores"][name]["per_class"]
    share = h["class"].value_counts() / (t["class"].value_counts() + h["class"].value_counts())
    assert share.between(0.15, 0.3).all()  # every class about a fifth held out


def test_label_free_model_is_shipped_small_and_knows_its_channels():
    path = packaged_model_path("ifc-cellcycle")
    assert path.is_file() and path.stat().st_size < 20e6
    lm = load_model("ifc-cellcycle", 2)
    assert lm.info["untrained"] is False and lm.channels == ["BF", "DF"]
    assert lm.prep.input_size == 40 and lm.model.cfg.patch_size == 8
    with pytest.raises(ConfigError, match="the packaged model ifc-cellcycle: trained on channels BF, DF"):
        run(
            RunConfig(
                plate=str(DATA / "holdout.zarr"),
                out="unused.zarr",
                model="ifc-cellcycle",
                cells=CellOptions(channels=("BF", "DNA")),
                progress=False,
            )
        )


def test_label_free_model_runs_exports_and_quantises(tmp_path):
    from scdino.export.onnx_export import export_onnx
    from scdino.export.quantize import quantize

    store = str(DATA / "holdout.zarr")
    cells = CellOptions(channels=("BF", "DF"))
    run(RunConfig(plate=store, out=str(tmp_path / "t.zarr"), model="ifc-cellcycle", cells=cells, progress=False))
    a = ad.read_zarr(tmp_path / "t.zarr")
    assert a.n_obs == 516 and np.isfinite(a.obsm["X_scdino"]).all()
    assert a.uns["scdino"]["model"]["model"] == "ifc-cellcycle"
    crops = CropStore(store).read(np.arange(64), [0, 2])
    meta = export_onnx("ifc-cellcycle", tmp_path / "m.onnx", crop_size=40, verify_with=crops)
    assert meta["channels"] == ["BF", "DF"] and meta["verification"]["passed"]
    q = quantize(tmp_path / "m.onnx", tmp_path / "m.int8.onnx", calibration=crops)
    assert q["quantization"]["min_cosine_to_fp32"] >= 0.99
    run(
        RunConfig(
            plate=store, out=str(tmp_path / "o.zarr"), model=str(tmp_path / "m.onnx"), cells=cells, progress=False
        )
    )
    b = ad.read_zarr(tmp_path / "o.zarr")
    x, y = a.obsm["X_scdino"], b.obsm["X_scdino"]
    assert ((x * y).sum(1) / np.linalg.norm(x, axis=1) / np.linalg.norm(y, axis=1)).min() > 0.9999
