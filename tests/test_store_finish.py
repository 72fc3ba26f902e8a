"""A store is marked complete only whole and never written after that; a failed write names the output."""

from __future__ import annotations

import errno
import hashlib
from pathlib import Path

import anndata as ad
import pytest
import zarr
from click.testing import CliRunner

from scdino.cells.options import CellOptions
from scdino.engine import output
from scdino.engine.output import store_status
from scdino.engine.pipeline import RunConfig, run
from scdino.errors import InputError


def _files(path) -> dict[str, str]:
    return {
        str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in Path(path).rglob("*")
        if p.is_file()
    }


def _cfg(plate, out):
    opts = CellOptions(labels="nuclei", crop_size=32)
    return RunConfig(plate=plate, out=str(out), model="random:vit_test16", cells=opts, progress=False)


def _no_space():
    return OSError(errno.ENOSPC, "No space left on device")  # as a write() on an open file raises it: no file name


@pytest.mark.parametrize("step", ["consolidate", "status"])
def test_a_full_disk_at_the_end_leaves_a_run_that_the_rerun_finishes_and_a_finished_store_is_never_rewritten(
    tiny_plate, tmp_path, monkeypatch, step
):
    out = tmp_path / "o.zarr"
    real_x, real_consolidate, real_open = output.EmbeddingStore._write_x, output.consolidate, zarr.open_group
    finishing = []

    def write_x(self, *a, **k):
        finishing.append(True)
        return real_x(self, *a, **k)

    def consolidate(path):
        if finishing and step == "consolidate":
            raise _no_space()
        return real_consolidate(path)

    def open_group(*a, **k):
        if finishing and step == "status" and k.get("use_consolidated") is True:
            raise _no_space()
        return real_open(*a, **k)

    with monkeypatch.context() as m:
        m.setattr(output.EmbeddingStore, "_write_x", write_x)
        m.setattr(output, "consolidate", consolidate)
        m.setattr(output.zarr, "open_group", open_group)
        with pytest.raises(OSError) as err:
            run(_cfg(tiny_plate, out))
    assert err.value.filename == str(out)  # the failed write names the output
    assert store_status(str(out))["status"] == "running"  # not marked complete: the rerun finishes it
    r = run(_cfg(tiny_plate, out))
    assert r.n_cells == 10 and store_status(str(out))["status"] == "complete"
    a = ad.read_zarr(out)  # whole: consolidated metadata, X, timing
    assert a.n_obs == 10 and a.X.shape == a.obsm["X_scdino"].shape and "timing" in a.uns["scdino"]
    before = _files(out)
    run(_cfg(tiny_plate, out))  # complete: nothing is written
    assert _files(out) == before


def test_the_one_line_of_a_full_disk_names_the_output(tiny_plate, tmp_path, monkeypatch):
    from scdino.engine.cli import main

    def no_space(self, *a, **k):
        raise _no_space()

    monkeypatch.setattr(output.EmbeddingStore, "write_blocks", no_space)
    out = tmp_path / "o.zarr"
    args = ["run", tiny_plate, "--labels", "nuclei", "--crop-size", "32", "--model", "random:vit_test16"]
    r = CliRunner().invoke(main, [*args, "--out", str(out)])
    assert r.exit_code == 2, r.output
    assert f"error: {out}: no space left on the device while writing the output" in r.output


def test_an_unfinished_store_read_with_anndata_or_scdino_says_it_is_unfinished_and_how_to_resume(
    tiny_plate, tmp_path, monkeypatch
):
    out = tmp_path / "o.zarr"
    real = output.EmbeddingStore.write_blocks
    calls = []

    def stop_after_one(self, i, emb):
        calls.append(i)
        if len(calls) > 1:
            raise KeyboardInterrupt  # as Ctrl-C between two blocks
        return real(self, i, emb)

    with monkeypatch.context() as m:
        m.setattr(output.EmbeddingStore, "write_blocks", stop_after_one)
        cfg = RunConfig(
            plate=tiny_plate,
            out=str(out),
            model="random:vit_test16",
            cells=CellOptions(labels="nuclei", crop_size=32),
            chunk_cells=4,
            progress=False,
        )
        with pytest.raises(KeyboardInterrupt):
            run(cfg)
    with pytest.raises(Exception, match="unfinished scdino-engine run.*run the same command again to resume"):
        ad.read_zarr(out)
    import scdino

    with pytest.raises(InputError, match=r"o.zarr: an unfinished scdino-engine run \(1 of 3 blocks embedded\)"):
        scdino.open(out)
    run(cfg)  # resumed
    assert ad.read_zarr(out).n_obs == 10 and scdino.open(out).n_obs == 10
