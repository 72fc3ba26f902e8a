"""--precision auto: int8 only where every check crop of the run's own plate keeps cosine >= 0.999 to fp32."""

from pathlib import Path
from types import SimpleNamespace

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from conftest import dino_full_checkpoint
from scdino.cells.options import CellOptions
from scdino.engine import precision
from scdino.engine.pipeline import RunConfig, run

OPTS = CellOptions(labels="nuclei", crop_size=24)


def test_cosines_by_hand():
    a = np.array([[1.0, 0.0], [1.0, 1.0], [3.0, 4.0]])
    b = np.array([[2.0, 0.0], [0.0, 1.0], [-3.0, -4.0]])
    np.testing.assert_allclose(precision.cosines(a, b), [1.0, 1 / np.sqrt(2), -1.0])


def test_check_rows_spread_over_the_first_fields_with_cells():
    tables = {
        "f1": pd.DataFrame({"i": []}),
        "f2": pd.DataFrame({"i": range(6)}),
        "f3": pd.DataFrame({"i": range(6, 10)}),
    }
    src = SimpleNamespace(parts=["f1", "f2", "f3", "f4"], read_columns=("i",), cells_of=lambda p: tables[p])
    # 8 wanted: f2's 6 cells are not enough, f2 and f3 give 10; rows round(0, 9/7, 18/7, ..., 9)
    assert list(precision.check_rows(src, n=8)["i"]) == [0, 1, 3, 4, 5, 6, 8, 9]
    # 4 wanted: f2 alone has enough; rows round(0, 5/3, 10/3, 5)
    assert list(precision.check_rows(src, n=4)["i"]) == [0, 2, 3, 5]
    empty = SimpleNamespace(parts=["f1"], read_columns=("i",), cells_of=lambda p: tables[p])
    assert len(precision.check_rows(empty)) == 0


@pytest.fixture()
def ckpt(tmp_path, monkeypatch) -> str:
    monkeypatch.setenv("SCDINO_CACHE_DIR", str(tmp_path / "cache"))
    path = tmp_path / "vit_test16.pth"
    dino_full_checkpoint(path, arch="vit_test16")
    return str(path)


def _run(plate, out, model, **kw):
    run(RunConfig(plate=plate, out=str(out), model=model, cells=OPTS, input_size=32, progress=False, **kw))
    a = ad.read_zarr(out)
    return a.obsm["X_scdino"], a.uns["scdino"]


def _cos(a, b):
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


@pytest.mark.slow
def test_auto_takes_int8_only_when_every_check_crop_agrees(tiny_plate, tmp_path, ckpt, monkeypatch):
    fp32, u32 = _run(tiny_plate, tmp_path / "fp32.zarr", ckpt, precision="fp32")
    assert "precision_check" not in u32["path"] and u32["model"]["precision"] == "fp32"
    auto, ua = _run(tiny_plate, tmp_path / "auto.zarr", ckpt)  # the default
    check = ua["path"]["precision_check"]
    assert check["chosen"] == "int8" and ua["model"]["precision"] == "int8"
    assert check["crops"] == 10 and check["min_cosine"] >= 0.999  # the tiny plate's 10 cells
    assert _cos(auto, fp32).min() >= 0.999  # what the check promised holds for every cell
    # the same crops with the same two models: the record is read back, no inference
    monkeypatch.setattr(precision, "_embed", lambda *a: pytest.fail("checked again"))
    _, uc = _run(tiny_plate, tmp_path / "auto2.zarr", ckpt)
    assert (
        uc["path"]["precision_check"]["cached"] and uc["path"]["precision_check"]["min_cosine"] == check["min_cosine"]
    )
    monkeypatch.undo()
    monkeypatch.setenv("SCDINO_CACHE_DIR", str(Path(ckpt).parent / "cache"))
    # a plate whose crops would move: fp32, exactly as --precision fp32
    monkeypatch.setattr(precision, "MIN_COSINE", 1.01)
    again, ub = _run(tiny_plate, tmp_path / "strict.zarr", ckpt)
    assert ub["path"]["precision_check"]["chosen"] == "fp32" and "< 1.01" in ub["path"]["precision_check"]["why"]
    np.testing.assert_array_equal(again, fp32)
    assert Path(ua["path"]["export"]).is_file()


def test_auto_stays_fp32_where_int8_does_not_apply(tiny_plate, tmp_path):
    _, u = _run(tiny_plate, tmp_path / "r.zarr", "random:vit_test8")  # an untrained model is never exported
    check = u["path"]["precision_check"]
    assert check["chosen"] == "fp32" and "trained checkpoint" in check["why"] and u["model"]["precision"] == "fp32"
