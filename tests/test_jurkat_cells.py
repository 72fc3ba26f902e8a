"""The Jurkat cell-cycle cells shipped for the comparison: split once, and a two-channel (BF+DF) model trained on them
by scdino-train runs through scdino-engine run, scdino-export onnx and quantize unchanged. The label-free model once
shipped as ``--model ifc-cellcycle`` is withdrawn (it did not beat an untrained network) and says so."""

from __future__ import annotations

import json
from pathlib import Path

import anndata as ad
import numpy as np
import pytest

from scdino.cells.cropstore import CropStore
from scdino.cells.options import CellOptions
from scdino.engine.pipeline import RunConfig, run
from scdino.errors import CheckpointError, ConfigError
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


def test_the_withdrawn_model_says_why_and_what_to_do():
    with pytest.raises(
        CheckpointError, match="ifc-cellcycle: the label-free cell-cycle model was withdrawn.*scdino-train"
    ):
        load_model("ifc-cellcycle", 2)


@pytest.fixture(scope="module")
def bf_df_model(tmp_path_factory) -> str:
    """A BF+DF model of the recipe's shape (patch 8, 40 px, fixed intensity range) trained briefly by scdino-train."""
    from scdino.training.config import build_config
    from scdino.training.loop import train

    out = tmp_path_factory.mktemp("bfdf")
    sets = [
        "global_size=40",
        "local_crops=0",
        "global_scale=1,1",
        "aspect_ratio=1,1",
        "rotation=180",
        "intensity_scaling=dataset",
        "out_dim=256",
        "head_hidden=64",
        "head_bottleneck=32",
        "warmup_epochs=0",
        "max_iters_per_epoch=2",
        "saveckp_freq=0",
    ]
    cfg = build_config(
        None,
        sets,
        data=str(DATA / "train.zarr"),
        out=str(out),
        arch="vit_test",
        patch=8,
        epochs=1,
        batch_size_per_device=16,
        channels=["BF", "DF"],
        device="cpu",
    )
    train(cfg)
    return str(out / "checkpoint.pth")


def test_a_two_channel_model_knows_its_channels(bf_df_model):
    lm = load_model(bf_df_model, 2)
    assert lm.channels == ["BF", "DF"] and lm.prep.input_size == 40 and lm.model.cfg.patch_size == 8
    assert lm.prep.scale_lo is not None  # the fixed range of the training cells travels with the model
    with pytest.raises(ConfigError, match="trained on channels BF, DF"):
        run(
            RunConfig(
                plate=str(DATA / "holdout.zarr"),
                out="unused.zarr",
                model=bf_df_model,
                cells=CellOptions(channels=("BF", "DNA")),
                progress=False,
            )
        )


@pytest.mark.slow
def test_a_two_channel_model_runs_exports_and_quantises(bf_df_model, tmp_path):
    from scdino.export.onnx_export import export_onnx
    from scdino.export.quantize import quantize

    store = str(DATA / "holdout.zarr")
    cells = CellOptions(channels=("BF", "DF"))
    # fp32 on both sides: the comparison is checkpoint vs its ONNX export (the default, auto, may pick int8)
    first = RunConfig(
        plate=store, out=str(tmp_path / "t.zarr"), model=bf_df_model, cells=cells, progress=False, precision="fp32"
    )
    run(first)
    a = ad.read_zarr(tmp_path / "t.zarr")
    assert a.n_obs == 516 and np.isfinite(a.obsm["X_scdino"]).all()
    crops = CropStore(store).read(np.arange(64), [0, 2])
    meta = export_onnx(bf_df_model, tmp_path / "m.onnx", crop_size=40, verify_with=crops)
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
