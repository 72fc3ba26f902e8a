import os
import shutil
import signal
import subprocess
import sys
import time

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch
import zarr

from scdino.cells.options import CellOptions
from scdino.cells.plate import Plate
from scdino.cells.table import field_cells, read_crops
from scdino.engine import output as output_mod
from scdino.engine.pipeline import RunConfig, run
from scdino.errors import OutputError
from scdino.models import load_model
from scdino.preprocess import apply


def plain_loop(plate_path: str, model: str, opts: CellOptions, input_size: int):
    """The engine without Dask: every field, every cell, one at a time."""
    plate = Plate(plate_path)
    lm = None
    rows, embs = [], []
    for ref in plate.fields():
        df = field_cells(plate, ref, opts)
        names = plate.channel_names(ref)
        chans = [names.index(c) for c in opts.channels] if opts.channels else list(range(len(names)))
        if lm is None:
            lm = load_model(model, len(chans), input_size)
        crops = read_crops(plate, df, chans, opts.crop_size)
        with torch.inference_mode():
            for c in crops:
                embs.append(lm.model(apply(torch.from_numpy(c[None].astype(np.int32)), lm.prep))[0].numpy())
        rows.append(df)
    return pd.concat(rows, ignore_index=True), np.stack(embs)


def cfg(plate, out, **kw) -> RunConfig:
    cells = kw.pop("cells", CellOptions(labels="nuclei", crop_size=24))
    return RunConfig(
        plate=plate,
        out=str(out),
        model=kw.pop("model", "random:vit_test8"),
        cells=cells,
        input_size=kw.pop("input_size", 32),
        progress=False,
        **kw,
    )


def test_dask_engine_equals_plain_loop(tiny_plate, tmp_path, client):
    opts = CellOptions(labels="nuclei", crop_size=24, channels=("GFP", "DAPI"))
    res = run(cfg(tiny_plate, tmp_path / "o.zarr", cells=opts, chunk_cells=3, batch_size=2))
    a = ad.read_zarr(tmp_path / "o.zarr")
    table, emb = plain_loop(tiny_plate, "random:vit_test8", opts, 32)
    assert res.n_cells == len(table) == a.n_obs == 10
    assert list(a.obs["well"]) == list(table["well"]) and list(a.obs["label"]) == list(table["label"])
    np.testing.assert_allclose(a.obsm["X_scdino"], emb, rtol=1e-4, atol=1e-5)
    u = a.uns["scdino"]
    assert u["status"] == "complete" and u["untrained"] and list(u["channels"]) == ["GFP", "DAPI"]
    assert u["preprocessing"]["input_size"] == 32 and u["backend"]["kind"] == "torch"
    assert set(a.obs.columns) >= {"plate", "well", "field", "label", "centroid_y", "centroid_x", "bbox_y0", "border"}
    assert a.obsm["X_scdino"].dtype == np.float32


def test_interrupted_run_resumes_without_loss_or_duplicates(scratch_plate, tmp_path, client, monkeypatch):
    ref_out, out = tmp_path / "ref.zarr", tmp_path / "o.zarr"
    full = run(cfg(scratch_plate, ref_out, chunk_cells=64))
    calls = {"n": 0}
    orig = output_mod.EmbeddingStore.write_block

    def dying(self, i, emb):
        if calls["n"] == 4:
            raise KeyboardInterrupt  # what Ctrl-C does in the middle of a run
        calls["n"] += 1
        orig(self, i, emb)

    monkeypatch.setattr(output_mod.EmbeddingStore, "write_block", dying)
    with pytest.raises(KeyboardInterrupt):
        run(cfg(scratch_plate, out, chunk_cells=64))
    assert output_mod.store_status(str(out))["status"] == "running"
    monkeypatch.setattr(output_mod.EmbeddingStore, "write_block", orig)
    again = run(cfg(scratch_plate, out, chunk_cells=64))
    assert again.resumed and again.blocks_run == full.blocks_run - 4
    a, b = ad.read_zarr(ref_out), ad.read_zarr(out)
    assert a.n_obs == b.n_obs == full.n_cells
    assert list(a.obs_names) == list(b.obs_names) and not b.obs_names.has_duplicates
    np.testing.assert_array_equal(a.obsm["X_scdino"], b.obsm["X_scdino"])
    # a complete store is not redone, and other settings never mix into it
    assert run(cfg(scratch_plate, out, chunk_cells=64)).blocks_run == 0
    with pytest.raises(OutputError, match="other settings.*--overwrite"):
        shutil.rmtree(out / "uns" / "scdino")  # make it look unfinished again
        g = zarr.open_group(str(out), mode="r+", use_consolidated=False)
        g.attrs["scdino"] = {**g.attrs["scdino"], "status": "running"}
        run(cfg(scratch_plate, out, chunk_cells=64, input_size=48))


@pytest.mark.slow
def test_distributed_scheduler_with_two_workers(tiny_plate, tmp_path):
    sched_file = tmp_path / "scheduler.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "distributed.cli.dask_scheduler",
                "--host",
                "127.0.0.1",
                "--port",
                "0",
                "--no-dashboard",
                "--scheduler-file",
                str(sched_file),
            ],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
    ]
    try:
        for _ in range(300):
            if sched_file.exists() and sched_file.stat().st_size:
                break
            time.sleep(0.1)
        for _ in range(2):
            procs.append(
                subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "distributed.cli.dask_worker",
                        "--scheduler-file",
                        str(sched_file),
                        "--nthreads",
                        "1",
                        "--no-dashboard",
                    ],
                    env=env,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
        import json

        from distributed import Client

        address = json.loads(sched_file.read_text())["address"]
        with Client(address) as c:
            c.wait_for_workers(2, timeout=60)
        res = run(cfg(tiny_plate, tmp_path / "d.zarr", scheduler=address, chunk_cells=2))
        with Client(address) as c:
            workers = c.run(lambda: __import__("os").getpid())
        assert len(workers) == 2
        table, emb = plain_loop(tiny_plate, "random:vit_test8", CellOptions(labels="nuclei", crop_size=24), 32)
        a = ad.read_zarr(tmp_path / "d.zarr")
        assert res.n_cells == len(table)
        np.testing.assert_allclose(a.obsm["X_scdino"], emb, rtol=1e-4, atol=1e-5)
    finally:
        for p in procs[::-1]:
            p.terminate()
        for p in procs:
            p.wait(timeout=30)


@pytest.mark.slow
def test_killed_process_resumes_to_the_same_embeddings(scratch_plate, tmp_path):
    """SIGKILL the real command midway, run it again, compare with an uninterrupted run."""
    out, ref = tmp_path / "k.zarr", tmp_path / "r.zarr"
    args = [
        "--model",
        "random:vit_tiny16",
        "--labels",
        "nuclei",
        "--crop-size",
        "32",
        "--input-size",
        "64",
        "--chunk-cells",
        "16",
        "--no-progress",
    ]
    cmd = [sys.executable, "-m", "scdino.engine", "run", scratch_plate, *args]
    p = subprocess.Popen(
        [*cmd, "--out", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    done = 0
    deadline = time.time() + 120
    while time.time() < deadline and p.poll() is None:
        try:
            prog = zarr.open_array(str(out / "uns" / "scdino_progress"), mode="r")[...]
            done = int(prog.sum())
            if 2 <= done < len(prog) - 5:
                break
        except Exception:  # the store is still being created
            pass
        time.sleep(0.05)
    assert p.poll() is None, "the run finished before it could be killed; make the plate bigger"
    os.killpg(p.pid, signal.SIGKILL)
    p.wait()
    assert output_mod.store_status(str(out))["status"] == "running"
    # the same command again, and an uninterrupted run, in this process (same library path, no new interpreter)
    same = dict(model="random:vit_tiny16", input_size=64, chunk_cells=16)
    cells = CellOptions(labels="nuclei", crop_size=32)
    run(cfg(scratch_plate, out, cells=cells, **same))
    run(cfg(scratch_plate, ref, cells=cells, **same))
    a, b = ad.read_zarr(out), ad.read_zarr(ref)
    assert a.uns["scdino"]["timing"]["resumed"] and list(a.obs_names) == list(b.obs_names)
    np.testing.assert_allclose(a.obsm["X_scdino"], b.obsm["X_scdino"], rtol=1e-5, atol=1e-6)


def test_big_endian_plate_gives_the_same_embeddings(tmp_path, client):
    from conftest import blob_field
    from scdino.engine.sample import FieldImage, write_plate

    rng = np.random.default_rng(0)
    f = blob_field(rng, [(20, 20), (50, 64), (70, 100)])
    little = write_plate(tmp_path / "le.zarr", {"A/1": [f]}, ["DAPI", "GFP"], ngff="0.4")
    big = write_plate(
        tmp_path / "be.zarr", {"A/1": [FieldImage(f.image.astype(">u2"), f.labels)]}, ["DAPI", "GFP"], ngff="0.4"
    )
    from scdino.cells.plate import FieldRef

    assert Plate(big).image(FieldRef("A/1", "0")).array.dtype.byteorder == ">"
    a = run(cfg(little, tmp_path / "a.zarr"))
    b = run(cfg(big, tmp_path / "b.zarr"))
    assert a.n_cells == b.n_cells == 3
    np.testing.assert_array_equal(
        ad.read_zarr(tmp_path / "a.zarr").obsm["X_scdino"], ad.read_zarr(tmp_path / "b.zarr").obsm["X_scdino"]
    )


def test_overwrite_replaces_the_old_output_only_when_the_new_run_writes(tiny_plate, tmp_path):
    from scdino.cells.options import SegmentParams
    from scdino.errors import InputError

    out = tmp_path / "o.zarr"
    run(cfg(tiny_plate, out))
    before = ad.read_zarr(out).obsm["X_scdino"].copy()
    no_nuclei = CellOptions(crop_size=24, segment=SegmentParams(threshold="1e9"))
    with pytest.raises(InputError, match="no nuclei found"):
        run(cfg(tiny_plate, out, cells=no_nuclei, overwrite=True))
    assert output_mod.store_status(str(out))["status"] == "complete"  # the finished run is still there, whole
    np.testing.assert_array_equal(ad.read_zarr(out).obsm["X_scdino"], before)


def test_small_stores_are_written_as_anndata_writes_them(tmp_path):
    obs = pd.DataFrame(
        {"well": pd.Categorical(["A/1", "B/2", "A/1"]), "label": [3, 1, 2], "area": [1.5, 2.0, np.nan]},
        index=["a", "b", "c"],
    )
    uns = {"scdino": {"model": {"arch": "vit_small16", "embed_dim": 384}, "channels": ["DAPI", "GFP"], "n": 3}}
    adata = ad.AnnData(obs=obs, uns=uns)
    with ad.settings.override(zarr_write_format=3):
        adata.write_zarr(tmp_path / "anndata.zarr")
    output_mod.write_small(str(tmp_path / "ours.zarr"), adata)
    theirs = sorted(p.relative_to(tmp_path / "anndata.zarr") for p in (tmp_path / "anndata.zarr").rglob("*"))
    ours = sorted(p.relative_to(tmp_path / "ours.zarr") for p in (tmp_path / "ours.zarr").rglob("*"))
    assert ours == theirs  # the same files, with the same bytes
    for rel in theirs:
        if (tmp_path / "anndata.zarr" / rel).is_file():
            assert (tmp_path / "ours.zarr" / rel).read_bytes() == (tmp_path / "anndata.zarr" / rel).read_bytes(), rel
    back = ad.read_zarr(tmp_path / "ours.zarr")
    pd.testing.assert_frame_equal(back.obs, obs)
    assert back.uns["scdino"]["model"] == uns["scdino"]["model"] and list(back.uns["scdino"]["channels"]) == [
        "DAPI",
        "GFP",
    ]
