"""The default fast path (cached, verified ONNX export of a checkpoint on the CPU), int8 and fast mode, and reading
each field once."""

from __future__ import annotations

import itertools
import json
import os
import time
from dataclasses import replace
from pathlib import Path

import anndata as ad
import numpy as np
import pytest

from conftest import dino_full_checkpoint
from scdino.cells.options import CellOptions
from scdino.cells.source import PlateSource
from scdino.cells.table import FIELDS
from scdino.engine import export_cache
from scdino.engine.pipeline import RunConfig, fast_input_size, run
from scdino.errors import ConfigError
from scdino.export.quantize import dynamic_forms
from scdino.export.verify import VerificationError
from scdino.models.card import describe_model

OPTS = CellOptions(labels="nuclei", crop_size=24)


@pytest.fixture()
def cache(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv("SCDINO_CACHE_DIR", str(root))
    return root


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("ckpt") / "vit_test16.pth"
    dino_full_checkpoint(path, arch="vit_test16")
    return str(path)


def _run(plate, out, model, **kw):
    kw.setdefault("precision", "fp32" if not kw.get("fast") else "auto")  # the fp32 cached path (auto: test_precision)
    return run(RunConfig(plate=plate, out=str(out), model=model, cells=OPTS, input_size=32, progress=False, **kw))


def _emb(out) -> tuple[np.ndarray, dict]:
    a = ad.read_zarr(out)
    return a.obsm["X_scdino"], a.uns["scdino"]


def _cos(a, b):
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def test_checkpoint_runs_from_its_cached_export_when_that_is_faster(tiny_plate, tmp_path, cache, ckpt, monkeypatch):
    timings = iter([0.1, 0.3])  # ONNX Runtime measured first, then PyTorch
    monkeypatch.setattr(export_cache, "_timing", lambda spec, crops: next(timings))
    res = _run(tiny_plate, tmp_path / "a.zarr", ckpt)
    assert res.backend == "onnxruntime on cpu"
    emb, uns = _emb(tmp_path / "a.zarr")
    path = uns["path"]
    assert path["path"] == "onnxruntime (cached export)" and "measured faster" in path["why"]
    assert path["timing"]["chosen"] == "onnxruntime" and Path(path["export"]).is_file()
    assert Path(path["export"]).parent.parent == cache / "onnx"
    sidecar = json.loads(Path(path["export"]).with_suffix(".json").read_text())
    assert sidecar["verification"]["passed"]
    # a second run reuses the entry and the recorded choice: no export, no timing
    monkeypatch.setattr(export_cache, "_timing", lambda *a: pytest.fail("timed again"))
    monkeypatch.setattr("scdino.engine.export_cache.export_onnx", lambda *a, **k: pytest.fail("exported again"))
    _run(tiny_plate, tmp_path / "b.zarr", ckpt)
    assert _emb(tmp_path / "b.zarr")[1]["path"]["path"] == "onnxruntime (cached export)"
    # the same embeddings as PyTorch
    _run(tiny_plate, tmp_path / "t.zarr", ckpt, export_cache=False)
    t_emb, t_uns = _emb(tmp_path / "t.zarr")
    assert t_uns["path"]["path"] == "torch" and "--no-export-cache" in t_uns["path"]["why"]
    assert _cos(emb, t_emb).min() > 0.99999


def test_a_damaged_cache_entry_is_exported_again(tiny_plate, tmp_path, cache, ckpt, monkeypatch):
    timings = itertools.cycle([0.1, 0.3])
    monkeypatch.setattr(export_cache, "_timing", lambda spec, crops: next(timings))
    _run(tiny_plate, tmp_path / "a.zarr", ckpt)
    onnx = Path(_emb(tmp_path / "a.zarr")[1]["path"]["export"])
    onnx.write_bytes(onnx.read_bytes()[:1000])  # truncated, as by a full disk
    _run(tiny_plate, tmp_path / "b.zarr", ckpt)
    assert _cos(_emb(tmp_path / "a.zarr")[0], _emb(tmp_path / "b.zarr")[0]).min() > 0.99999
    assert onnx.stat().st_size > 1000 and len(export_cache.entries()) == 1


def test_pytorch_stays_when_it_measures_faster(tiny_plate, tmp_path, cache, ckpt, monkeypatch):
    timings = iter([0.5, 0.2])
    monkeypatch.setattr(export_cache, "_timing", lambda spec, crops: next(timings))
    res = _run(tiny_plate, tmp_path / "a.zarr", ckpt)
    assert res.backend == "torch on cpu"
    path = _emb(tmp_path / "a.zarr")[1]["path"]
    assert path["path"] == "torch" and "PyTorch measured faster" in path["why"]


def test_a_failed_export_falls_back_to_pytorch_and_leaves_no_entry(tiny_plate, tmp_path, cache, ckpt, monkeypatch):
    def broken(*a, **k):
        raise VerificationError("differs from PyTorch")

    monkeypatch.setattr("scdino.engine.export_cache.export_onnx", broken)
    res = _run(tiny_plate, tmp_path / "a.zarr", ckpt)
    assert res.backend == "torch on cpu"
    assert "export failed" in _emb(tmp_path / "a.zarr")[1]["path"]["why"]
    assert export_cache.entries() == []


def test_untrained_models_and_explicit_backends_are_not_exported(tiny_plate, tmp_path, cache, ckpt, monkeypatch):
    monkeypatch.setattr("scdino.engine.export_cache.export_onnx", lambda *a, **k: pytest.fail("exported"))
    _run(tiny_plate, tmp_path / "r.zarr", "random:vit_test8")
    assert "untrained" in _emb(tmp_path / "r.zarr")[1]["path"]["why"]
    _run(tiny_plate, tmp_path / "t.zarr", ckpt, backend="torch")
    assert "--backend torch" in _emb(tmp_path / "t.zarr")[1]["path"]["why"]
    monkeypatch.setenv("SCDINO_EXPORT_CACHE", "0")
    _run(tiny_plate, tmp_path / "e.zarr", ckpt)
    assert "SCDINO_EXPORT_CACHE" in _emb(tmp_path / "e.zarr")[1]["path"]["why"]


def test_int8_is_the_verified_quantised_export(tiny_plate, tmp_path, cache, ckpt):
    _run(tiny_plate, tmp_path / "f.zarr", ckpt, export_cache=False)
    _run(tiny_plate, tmp_path / "q.zarr", ckpt, precision="int8")
    q, uns = _emb(tmp_path / "q.zarr")
    assert uns["path"]["path"] == "onnxruntime int8 (cached export)"
    assert uns["model"]["precision"] == "int8"
    fast = dynamic_forms()[0][0]
    assert f"({fast} weights)" in uns["path"]["why"]  # the first form this CPU may run kept cosine >= 0.999
    assert _cos(q, _emb(tmp_path / "f.zarr")[0]).min() > 0.99
    with pytest.raises(ConfigError, match="trained checkpoint"):
        _run(tiny_plate, tmp_path / "r.zarr", "random:vit_test8", precision="int8")


def test_fast_mode_is_int8_at_half_the_input(tiny_plate, tmp_path, cache, ckpt):
    card = describe_model(ckpt, n_channels=2, input_size=64)
    assert fast_input_size(card) == 32
    assert fast_input_size(describe_model(ckpt, n_channels=2, input_size=32)) == 32  # two patches at least
    with pytest.raises(ConfigError, match="--fast"):
        RunConfig(plate=tiny_plate, out="x", fast=True, input_size=64).validate()
    run(RunConfig(plate=tiny_plate, out=str(tmp_path / "f.zarr"), model=ckpt, cells=OPTS, fast=True, progress=False))
    uns = _emb(tmp_path / "f.zarr")[1]
    assert uns["model"]["precision"] == "int8" and uns["model"]["input_size"] == 112  # built for 224


def test_cache_clear_removes_only_its_own_entries(tiny_plate, tmp_path, cache, ckpt, monkeypatch):
    timings = iter([0.1, 0.3])
    monkeypatch.setattr(export_cache, "_timing", lambda spec, crops: next(timings))
    _run(tiny_plate, tmp_path / "a.zarr", ckpt)
    foreign = cache / "onnx" / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("a user's file")
    assert len(export_cache.entries()) == 2
    assert export_cache.clear() == 1
    assert (foreign / "notes.txt").is_file() and len(export_cache.entries()) == 1


def test_each_field_is_decoded_once_per_reader(tiny_plate):
    source = PlateSource(tiny_plate, OPTS)
    table = source.find_cells()
    before = FIELDS.decodes
    for a in range(0, len(table), 2):  # blocks of two cells: several blocks per field
        source.read(table.iloc[a : a + 2][list(source.read_columns)])
    assert FIELDS.decodes - before == source.n_fields
    # cells come ordered by field, then position
    for _, g in table.groupby(["well", "field"], sort=False):
        assert list(g["crop_y0"]) == sorted(g["crop_y0"])
    # another reader (another command) decodes again: a rewritten plate is never served from memory
    PlateSource(tiny_plate, OPTS).read(table.iloc[:1][list(source.read_columns)])
    assert FIELDS.decodes - before == source.n_fields + 1


def test_cpu_batch_size_follows_the_tokens_of_a_pass():
    from scdino.engine.config import cpu_batch_size

    # the measured best batches (benchmarks/cpu_settings.py): ViT-tiny/16 at 32 px, ViT-tiny/8 at 48, ViT-S/16 at 224
    assert [cpu_batch_size(t) for t in (5, 37, 50, 197, 10_000)] == [256, 64, 64, 16, 16]
    card = describe_model("default", n_channels=3)
    assert card.patch_size == 8 and card.tokens == 37  # 6 x 6 patches + CLS


def test_gpu_batch_size_follows_the_tokens_of_a_pass_and_never_exceeds_a_block(monkeypatch):
    from scdino.engine import pipeline
    from scdino.engine.config import gpu_batch_size

    # ViT-S/16 at 224 px (197 tokens): 256; ViT-B/8 at 224 (785): 64; the default model (37): capped at 256
    assert [gpu_batch_size(t) for t in (37, 197, 785, 100_000)] == [256, 256, 64, 32]
    card = describe_model("default", n_channels=3)
    monkeypatch.setattr(pipeline, "resolve", lambda backend, device, model: ("torch", "cuda"))
    cfg = RunConfig(plate="p.zarr", out="o.zarr", workers=1)
    assert pipeline.backend_spec(cfg, card, 3).batch_size == 256
    small = RunConfig(plate="p.zarr", out="o.zarr", workers=1, chunk_cells=100)
    assert pipeline.backend_spec(small, card, 3).batch_size == 100
    monkeypatch.setattr(pipeline, "resolve", lambda backend, device, model: ("torch", "cpu"))
    assert pipeline.backend_spec(cfg, card, 3).batch_size == 64  # the CPU rule for the same model


def test_one_embedding_at_a_time_per_worker_while_other_threads_find_and_cut(tiny_plate, tmp_path, monkeypatch):
    """A worker with several threads runs one inference at a time; meanwhile its other threads have the next fields'
    cells found and cut (in feeder processes: the log is a file, which they append to as well)."""
    from distributed import Client, LocalCluster

    from scdino.engine.backends.torch_backend import TorchBackend

    log = tmp_path / "log.txt"
    real_infer, real_find = TorchBackend.infer, PlateSource.cells_and_crops

    def note(event: str) -> None:
        with open(log, "a") as f:
            f.write(f"{event} {time.perf_counter()}\n")

    def infer(self, crops):
        note("embed-start")
        time.sleep(0.05)
        out = real_infer(self, crops)
        note("embed-end")
        return out

    def find(self, part, alloc=np.empty):
        note("find-start")
        if part != self.fields[0]:
            time.sleep(0.3)  # the first field's blocks embed meanwhile
        out = real_find(self, part, alloc)
        note("find-end")
        return out

    monkeypatch.setattr(TorchBackend, "infer", infer)
    monkeypatch.setattr(PlateSource, "cells_and_crops", find)
    cfg = RunConfig(tiny_plate, str(tmp_path / "o.zarr"), "random:vit_test8", OPTS, input_size=32, chunk_cells=2)
    with (
        LocalCluster(n_workers=1, threads_per_worker=3, processes=False, dashboard_address=":0") as cluster,
        Client(cluster) as client,
        client.as_current(),
    ):
        res = run(replace(cfg, progress=False))
    events = sorted((float(t), e) for e, t in (line.split() for line in log.read_text().splitlines()))
    running = most_running = finding = found_while_embedding = 0
    for _, e in events:
        if e == "embed-start":
            running += 1
            most_running = max(most_running, running)
            found_while_embedding += finding > 0
        elif e == "embed-end":
            running -= 1
        elif e == "find-start":
            finding += 1
            found_while_embedding += running > 0
        elif e == "find-end":
            finding -= 1
    assert res.n_cells == 10 and sum(e == "embed-end" for _, e in events) == 5  # 10 cells in blocks of 2
    assert most_running == 1, events  # one model at a time, although three threads take tasks
    assert found_while_embedding >= 1, events  # the next fields are searched while a block embeds


def test_local_workers_get_their_share_of_the_cores(monkeypatch):
    import distributed

    from scdino.engine import cluster

    monkeypatch.setattr(cluster, "cores", lambda: 16)
    # a GPU worker: its share of the host's cores, at least two; a CPU worker: twice its share (threads that wait on
    # the feeder processes and the model), at least two
    assert [cluster.gpu_threads_per_worker(w) for w in (1, 2, 4, 8, 16)] == [16, 8, 4, 2, 2]
    assert [cluster.cpu_threads_per_worker(w) for w in (1, 3, 32)] == [32, 10, 2]
    monkeypatch.undo()

    def no_client():
        raise ValueError("no client")

    monkeypatch.setattr(distributed, "get_client", no_client)  # start a cluster of our own, as a command does
    with cluster.dask_client(workers=1) as client:
        assert list(client.nthreads().values()) == [max(2, 2 * len(os.sched_getaffinity(0)))]
