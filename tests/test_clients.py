"""The real clients of scdino's outputs, run as their users run them: pycytominer 1.7.1 (annotate, normalize,
feature_select, aggregate with their defaults) on ``profiles`` and ``export-cells`` tables, and scanpy 1.11.5
(pp.pca, pp.neighbors, tl.leiden with their defaults) on the embeddings store. Both are in the ``dev`` extra."""

import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pycytominer
import pytest
import scanpy as sc
from test_profiles import synthetic_store

from scdino.engine.output import EmbeddingStore
from scdino.engine.profiles import ProfileOptions, export_cells, join_plate_map, profiles, well_id
from scdino.engine.sample import SAMPLE_PLATE_MAP, write_sample_plate_map

WELLS = list(SAMPLE_PLATE_MAP)  # A/1 .. B/4, as the neocortex-wells sample plate names them

#: what a run of a plate records of its source (the store names its cells by it: well/field/label)
PLATE_SOURCE = {"kind": "plate", "capabilities": ["wells", "label_images"], "path": "plate.zarr"}


@pytest.fixture
def screen(tmp_path):
    """A store of the sample plate's 8 wells, its profiles, its exported cells and the shipped plate map."""
    table, x = synthetic_store(tmp_path / "c.zarr", WELLS, per_well=6, dim=8)
    write_sample_plate_map(str(tmp_path / "map.csv"))
    profiles(str(tmp_path / "c.zarr"), str(tmp_path / "p.parquet"))
    export_cells(str(tmp_path / "c.zarr"), str(tmp_path / "cells.parquet"))
    return tmp_path, table, x


def test_pycytominer_annotates_normalizes_and_selects_with_its_defaults(screen):
    tmp, table, x = screen
    annotated = pycytominer.annotate(str(tmp / "p.parquet"), str(tmp / "map.csv"))  # every argument its default
    assert len(annotated) == 8  # was 0: A01 in the map, A/1 in the profiles
    by_well = dict(zip(annotated["Metadata_Well"], annotated["Metadata_treatment"]))
    assert by_well == {"A01": "DMSO", "B01": "DMSO", "A02": "drug-a", "B02": "drug-a"} | {
        "A03": "drug-b",
        "B03": "drug-b",
        "A04": "drug-c",
        "B04": "drug-c",
    }
    normalized = pycytominer.normalize(annotated, samples="Metadata_treatment == 'DMSO'")
    feats = [f"Cells_scdino_{i:04d}" for i in range(8)]
    raw = annotated[feats].to_numpy(np.float64)
    ctrl = raw[(annotated["Metadata_treatment"] == "DMSO").to_numpy()]
    want = (raw - ctrl.mean(0)) / ctrl.std(0)  # standardize against the two DMSO wells, by hand
    np.testing.assert_allclose(normalized[feats].to_numpy(np.float64), want, rtol=1e-4, atol=1e-4)
    selected = pycytominer.feature_select(normalized)
    kept = [c for c in selected if not c.startswith("Metadata_")]
    assert kept and set(kept) <= set(feats)  # features found (was "No features or metadata found")
    assert "Metadata_treatment" in selected and len(selected) == 8


def test_pycytominer_aggregates_exported_cells_to_the_profiles(screen):
    tmp, table, x = screen
    cells = pd.read_parquet(tmp / "cells.parquet")
    per_well = pycytominer.aggregate(cells)  # strata Metadata_Plate, Metadata_Well; median
    ours = pd.read_parquet(tmp / "p.parquet")
    feats = [f"Cells_scdino_{i:04d}" for i in range(8)]
    merged = ours.merge(per_well, on=["Metadata_Plate", "Metadata_Well"], suffixes=("", "_pcm"))
    assert len(merged) == 8
    np.testing.assert_allclose(
        merged[feats].to_numpy(np.float64), merged[[f"{c}_pcm" for c in feats]].to_numpy(np.float64), rtol=1e-6
    )
    assert pycytominer.normalize(cells).shape == cells.shape  # defaults: every cell standardised against all
    assert len(pycytominer.feature_select(cells)) == len(cells)


@pytest.mark.parametrize("form", ["A01", "A1", "A/1", "a01"])
def test_plate_maps_match_in_every_well_form(screen, form):
    tmp, table, x = screen
    write = {"A01": lambda w: w.replace("/", "0"), "A1": lambda w: w.replace("/", ""), "A/1": str}
    write["a01"] = lambda w: w.replace("/", "0").lower()
    lines = ["Metadata_Well,treatment"] + [f"{write[form](w)},{t}" for w, t in SAMPLE_PLATE_MAP.items()]
    (tmp / f"{form.replace('/', '_')}.csv").write_text("\n".join(lines) + "\n")
    out = join_plate_map(pd.read_parquet(tmp / "p.parquet"), str(tmp / f"{form.replace('/', '_')}.csv"))
    assert dict(zip(out["Metadata_Well"], out["Metadata_treatment"])) == {
        w.replace("/", "0"): t for w, t in SAMPLE_PLATE_MAP.items()
    }


def test_well_ids():
    assert [well_id(w) for w in ("A/1", "A/01", "A1", "a01", "H/12", "AF/48", "P24")] == [
        "A01",
        "A01",
        "A01",
        "A01",
        "H12",
        "AF48",
        "P24",
    ]


def test_the_shipped_plate_map_names_its_wells_as_pycytominer_joins_them(tmp_path):
    write_sample_plate_map(str(tmp_path / "m.csv"))
    assert (tmp_path / "m.csv").read_text().splitlines()[:2] == ["well_position,treatment", "A01,DMSO"]
    synthetic_store(tmp_path / "c.zarr", WELLS)
    out = profiles(
        str(tmp_path / "c.zarr"),
        str(tmp_path / "p.parquet"),
        ProfileOptions(metadata=str(tmp_path / "m.csv")),
    )
    assert out["Metadata_treatment"].tolist() == [SAMPLE_PLATE_MAP[w] for w in WELLS]


def three_groups(path, n=60, dim=16, seed=0):
    """A finished store of ``n`` cells in three tight, far-apart groups (known clusters)."""
    rng = np.random.default_rng(seed)
    group = np.arange(n) % 3
    centres = rng.normal(size=(3, dim)) * 20
    x = (centres[group] + rng.normal(size=(n, dim))).astype(np.float32)
    table = pd.DataFrame({"plate": "p", "well": "A/1", "field": "0", "label": np.arange(1, n + 1)})
    store = EmbeddingStore.create(str(path), table, dim, 16, {"status": "running", "source": PLATE_SOURCE}, "fp")
    for i in range(store.n_blocks):
        a, b = store.block_range(i)
        store.write_block(i, x[a:b])
    return store, x, group


def test_scanpy_defaults_run_on_the_store(tmp_path):
    store, x, group = three_groups(tmp_path / "c.zarr")
    store.finish({"status": "complete"})
    a = ad.read_zarr(tmp_path / "c.zarr")
    assert a.shape == (60, 16) and a.var_names[0] == "scdino_0000"  # was (60, 0)
    np.testing.assert_array_equal(a.X, x)
    np.testing.assert_array_equal(a.obsm["X_scdino"], x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # scanpy's notice of its next default leiden flavour
        sc.pp.pca(a)
        sc.pp.neighbors(a)  # no use_rep: X (16 dims, under scanpy's 50) as it is
        sc.tl.leiden(a)
    clusters = a.obs["leiden"].astype(str).to_numpy()
    for c in set(clusters):  # every cluster holds cells of one group only
        assert len(set(group[clusters == c])) == 1
    assert a.obsm["X_pca"].shape == (60, 15)


def test_a_finish_stopped_while_writing_x_is_finished_on_resume(tmp_path):
    store, x, _ = three_groups(tmp_path / "c.zarr")
    real = store._write_x

    def stopped():
        real()
        raise KeyboardInterrupt  # X and var written, the store not yet complete

    store._write_x = stopped
    with pytest.raises(KeyboardInterrupt):
        store.finish({"status": "complete"})
    again = EmbeddingStore.resume(str(tmp_path / "c.zarr"), "fp")
    again.finish({"status": "complete"})
    a = ad.read_zarr(tmp_path / "c.zarr")
    np.testing.assert_array_equal(a.X, x)
    assert a.uns["scdino"]["status"] == "complete"
