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
import zarr

import reference
from conftest import dino_full_checkpoint
from scdino.cells.options import CellOptions
from scdino.cells.plate import Plate
from scdino.engine import output as output_mod
from scdino.engine.pipeline import RunConfig, run
from scdino.errors import OutputError

VIT_TEST_HEADS = 2  # vit_test: embed 32, depth 2, 2 heads (the tiny test variant's definition)
# The Dask engine runs float32 PyTorch; the oracle is float64 throughout. For this two-block ViT at 32 px the float32
# rounding of the resize, LayerNorms, softmax and residual sums moves a CLS value by about 1e-6 (values are O(1)), so
# 1e-4 / 1e-5 keeps a margin of 10x; a crop cut one pixel off the rule moves values by 1e-2 or more (checked below).
RTOL, ATOL = 1e-4, 1e-5


@pytest.fixture(scope="module")
def test8_checkpoint(tmp_path_factory) -> str:
    """A DINO full checkpoint of the RGB ViT-test/8, as main_dino.py saves it (the engine adapts it to the plate)."""
    path = tmp_path_factory.mktemp("ckpt") / "vit_test8.pth"
    dino_full_checkpoint(path, arch="vit_test8", in_chans=3)
    return str(path)


def plain_loop(plate_path: str, checkpoint: str, channels, crop: int, input_size: int, shift: int = 0):
    """The engine written out from its definitions, without scdino (tests/reference.py): every field, every labelled
    nucleus (scikit-image regionprops), its mass-centred crop on the first selected channel, the min-max + bilinear
    preprocessing and the float64 CLS forward of the checkpoint's teacher, mean-adapted to the plate's channels.
    Returns {(well, field, label): embedding}; ``shift`` moves every crop's centre by that many pixels (a wrong rule)."""
    sd = reference.teacher_backbone(checkpoint)
    out = {}
    for well, field, path in reference.fields(plate_path):
        names = reference.channel_names(path)
        chans = list(channels) if channels else names
        img = reference.read_level0(path)
        lab = reference.read_level0(os.path.join(path, "labels", "nuclei"))
        weights = {**sd, "patch_embed.proj.weight": reference.adapt_mean(sd["patch_embed.proj.weight"], len(chans))}
        sel = img[[names.index(c) for c in chans]]
        for lid, cy, cx in reference.nuclei(lab, sel[0].astype(np.float64)):
            x = reference.preprocess(reference.cut(sel, cy + shift, cx, crop), input_size)
            out[(well, field, int(lid))] = reference.vit_cls(weights, x, heads=VIT_TEST_HEADS, size=input_size)
    return out


def rows_of(a: ad.AnnData) -> list[tuple[str, str, int]]:
    return [(w, f, int(lab)) for w, f, lab in zip(a.obs["well"], a.obs["field"], a.obs["label"])]


#: the checkpoint through PyTorch, not its cached ONNX export: the test is of the pipeline, not of the export cache
TORCH = dict(backend="torch", export_cache=False)


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


def test_dask_engine_equals_plain_loop(tiny_plate, test8_checkpoint, tmp_path, client):
    opts = CellOptions(labels="nuclei", crop_size=24, channels=("GFP", "DAPI"))
    res = run(
        cfg(tiny_plate, tmp_path / "o.zarr", cells=opts, model=test8_checkpoint, chunk_cells=3, batch_size=2, **TORCH)
    )
    a = ad.read_zarr(tmp_path / "o.zarr")
    want = plain_loop(tiny_plate, test8_checkpoint, ("GFP", "DAPI"), 24, 32)
    assert res.n_cells == a.n_obs == len(want) == 10  # the tiny plate: 4 + 3 + 3 disks
    assert sorted(rows_of(a)) == sorted(want) and len(set(rows_of(a))) == a.n_obs  # each nucleus once
    got = a.obsm["X_scdino"]
    np.testing.assert_allclose(got, np.stack([want[r] for r in rows_of(a)]), rtol=RTOL, atol=ATOL)
    off = plain_loop(tiny_plate, test8_checkpoint, ("GFP", "DAPI"), 24, 32, shift=1)  # the tolerance tells crops apart
    assert np.abs(got - np.stack([off[r] for r in rows_of(a)])).max() > 100 * ATOL
    u = a.uns["scdino"]
    assert u["status"] == "complete" and not u["untrained"] and list(u["channels"]) == ["GFP", "DAPI"]
    assert u["preprocessing"]["input_size"] == 32 and u["backend"]["kind"] == "torch"
    assert set(a.obs.columns) >= {"plate", "well", "field", "label", "centroid_y", "centroid_x", "bbox_y0", "border"}
    assert a.obsm["X_scdino"].dtype == np.float32


def test_interrupted_run_resumes_without_loss_or_duplicates(scratch_plate, tmp_path, client, monkeypatch):
    ref_out, out = tmp_path / "ref.zarr", tmp_path / "o.zarr"
    full = run(cfg(scratch_plate, ref_out, chunk_cells=64))
    calls = {"n": 0}
    orig = output_mod.EmbeddingStore.write_blocks

    def dying(self, i, emb):
        if calls["n"] == 4:
            raise KeyboardInterrupt  # what Ctrl-C does in the middle of a run
        calls["n"] += len(emb) // 64  # a CPU task is one 64-cell block here
        orig(self, i, emb)

    monkeypatch.setattr(output_mod.EmbeddingStore, "write_blocks", dying)
    with pytest.raises(KeyboardInterrupt):
        run(cfg(scratch_plate, out, chunk_cells=64))
    assert output_mod.store_status(str(out))["status"] == "running"
    monkeypatch.setattr(output_mod.EmbeddingStore, "write_blocks", orig)
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
def test_distributed_scheduler_with_two_workers(tiny_plate, test8_checkpoint, tmp_path):
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
        out = tmp_path / "d.zarr"
        res = run(cfg(tiny_plate, out, scheduler=address, model=test8_checkpoint, chunk_cells=2, **TORCH))
        with Client(address) as c:
            workers = c.run(lambda: __import__("os").getpid())
        assert len(workers) == 2
        want = plain_loop(tiny_plate, test8_checkpoint, None, 24, 32)
        a = ad.read_zarr(out)
        assert res.n_cells == a.n_obs == len(want) == 10 and sorted(rows_of(a)) == sorted(want)
        np.testing.assert_allclose(a.obsm["X_scdino"], np.stack([want[r] for r in rows_of(a)]), rtol=RTOL, atol=ATOL)
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
