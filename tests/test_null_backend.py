"""The null backend (SCDINO_NULL_BACKEND=1, for benchmarks/pipeline_ceiling.py): the whole run with zeros of the
model's width instead of embeddings, labelled in the output, never resumed into a real run."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pytest

from scdino.cells.options import CellOptions
from scdino.engine.pipeline import RunConfig, run
from scdino.errors import OutputError


def _cfg(plate, out):
    return RunConfig(
        plate=plate,
        out=str(out),
        model="random:vit_test8",
        cells=CellOptions(labels="nuclei", crop_size=24),
        input_size=32,
        progress=False,
    )


def test_null_backend_runs_the_pipeline_and_says_so(tiny_plate, tmp_path, monkeypatch):
    real = run(_cfg(tiny_plate, tmp_path / "real.zarr"))
    monkeypatch.setenv("SCDINO_NULL_BACKEND", "1")
    res = run(_cfg(tiny_plate, tmp_path / "null.zarr"))
    a, b = ad.read_zarr(tmp_path / "real.zarr"), ad.read_zarr(tmp_path / "null.zarr")
    assert res.n_cells == real.n_cells == 10 and list(a.obs["label"]) == list(b.obs["label"])
    assert b.obsm["X_scdino"].shape == (10, 32) and not b.obsm["X_scdino"].any()  # vit_test: 32 wide, all zeros
    assert b.uns["scdino"]["backend"]["kind"] == "null" and res.backend == "null on cpu"
    assert a.obsm["X_scdino"].any()
    # a real run into the null run's output is another run: never mixed in
    monkeypatch.delenv("SCDINO_NULL_BACKEND")
    with pytest.raises(OutputError, match="--overwrite"):
        run(_cfg(tiny_plate, tmp_path / "null.zarr"))
    np.testing.assert_array_equal(ad.read_zarr(tmp_path / "null.zarr").obsm["X_scdino"], 0)
