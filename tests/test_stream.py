"""The embedding stream: cells found part by part, blocks submitted as soon as their rows are known, one writer."""

import logging
import threading
import time
from dataclasses import replace
from types import SimpleNamespace

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from scdino.cells.options import CellOptions
from scdino.cells.source import PlateSource
from scdino.cells.table import FieldCache
from scdino.engine import output as output_mod
from scdino.engine import pipeline
from scdino.engine.pipeline import RunConfig, run
from scdino.engine.stream import MEMORY_PER_WORKER, Rows, Writer, stream_plan

OPTS = CellOptions(labels="nuclei", crop_size=24)


def test_rows_are_known_up_to_the_first_missing_part():
    rows = Rows(3)
    part = lambda *v: pd.DataFrame({"v": list(v), "w": [10 * x for x in v]})  # noqa: E731
    rows.add(2, part(5, 6, 7))
    assert rows.known == 0 and not rows.complete  # part 0 is still missing
    rows.add(0, part(1, 2))
    assert rows.known == 2
    rows.add(1, part())  # a field without cells
    assert rows.known == 5 and rows.complete
    got = rows.rows(1, 4, ["v"])
    assert list(got["v"]) == [2, 5, 6] and list(got.columns) == ["v"] and list(got.index) == [0, 1, 2]
    assert list(rows.rows(2, 5, ["w"])["w"]) == [50, 60, 70]
    # rows 1:4 lie in part 0 (its row 1) and part 2 (its rows 0 and 1; part 1 is empty)
    assert [(p.part, p.a, p.b, p.lo, p.hi) for p in rows.pieces(1, 4)] == [(0, 1, 2, 0, 1), (2, 0, 2, 1, 3)]
    # settled: rows come from the whole table, the parts' own tables are let go; pieces still name the parts
    rows.settle(pd.concat([p for p in rows.parts if p is not None and len(p)], ignore_index=True))
    assert rows.parts == [None, None, None]
    pd.testing.assert_frame_equal(rows.rows(1, 4, ["v"]), got)
    assert [(p.part, p.a, p.b) for p in rows.pieces(1, 4)] == [(0, 1, 2), (2, 0, 2)]


def _spec(device: str, kind: str, batch: int, input_size: int = 224):
    return SimpleNamespace(device=device, kind=kind, batch_size=batch, card=SimpleNamespace(input_size=input_size))


def test_stream_plan_sizes_tasks_by_device_and_memory():
    src = SimpleNamespace(crop_size=32, channels=(0, 1, 2), dtype=np.uint16)
    # a CPU model: one block per task, two tasks per thread
    plan = stream_plan(_spec("cpu", "torch", 64), src, 256, 1, 2, feeders=2)
    assert (plan.chunk, plan.group, plan.window) == (256, 1, 4)
    # found crops wait: enough to fill the window (4 tasks of 256 cells; at least two tasks), within the worker's
    # budget (1536 MiB of 3 x 32 x 32 uint16 crops, 6 KiB each: 262,144 cells); parts are searched two per feeder,
    # but on all threads but one per worker (the one that embeds): 2 threads leave one part at a time
    assert (plan.held, plan.parts, plan.feeders) == (1024, 1, 2)
    assert stream_plan(_spec("cpu", "torch", 64), src, 256, 1, 4, feeders=2).parts == 3  # 4 threads, one embeds
    big_window = stream_plan(_spec("cuda", "torch", 256), src, 256, 8, 512, feeders=2)  # 1024 tasks of 2048 cells
    assert big_window.held == 8 * 262_144  # the budget of 8 workers
    assert stream_plan(_spec("cpu", "torch", 64), src, 256, 1, 1, feeders=0).parts == 1  # at least one
    # tasks carry their rows unless the cluster is this command's own, of one worker (nowhere for a task to move)
    assert plan.rows_always and not stream_plan(_spec("cpu", "torch", 64), src, 256, 1, 2, fixed=True).rows_always
    assert stream_plan(_spec("cpu", "torch", 64), src, 256, 2, 4, fixed=True).rows_always
    assert stream_plan(_spec("cpu", "torch", 64), src, 256, 2, 16, feeders=3).parts == 12  # 2 per feeder, here
    # a GPU (or the null backend): about four batches per task, from 2048 to 8192 cells
    assert stream_plan(_spec("cuda", "torch", 256), src, 256, 1, 16).group == 8  # 2048 cells: 4 x 256 is fewer
    assert stream_plan(_spec("cuda", "torch", 32), src, 256, 1, 16).group == 8  # at least 2048
    assert stream_plan(_spec("cuda", "torch", 4096), src, 256, 1, 16).group == 32  # at most 8192
    assert stream_plan(_spec("cpu", "null", 64), src, 256, 1, 2).group == 8
    # the window: twice the threads, unless the tasks' crops would not fit the memory budget: 256 px crops of 5
    # uint16 channels are 640 KiB a cell, a task of 2048 cells 1280 MiB; two workers' 2 x 1536 MiB hold two
    big = SimpleNamespace(crop_size=256, channels=(0, 1, 2, 3, 4), dtype=np.uint16)
    assert MEMORY_PER_WORKER == 1536 << 20
    assert stream_plan(_spec("cuda", "torch", 256), big, 256, 2, 32).window == 2
    assert stream_plan(_spec("cuda", "torch", 256), src, 256, 2, 32).window == 64


def test_writer_stops_at_the_first_failed_write():
    done = []
    w = Writer()

    def fail():
        raise KeyboardInterrupt

    w(done.append, 1)
    w(fail)
    w(done.append, 2)  # after the failure: never written
    with pytest.raises(KeyboardInterrupt):
        w.close()
    assert done == [1]


def test_concurrent_readers_of_one_field_decode_it_once():
    cache, calls = FieldCache(), []

    def slow_load():
        calls.append(1)
        time.sleep(0.2)
        return np.zeros((2, 8, 8), np.uint16)

    got = []
    threads = [
        threading.Thread(target=lambda: got.append(cache.get(("t", "A/1", "0"), 256, slow_load))) for _ in range(4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and cache.decodes == 1 and len(got) == 4
    assert all(g is got[0] for g in got)


def test_cache_keeps_fields_within_its_byte_budget():
    cache = FieldCache(total_bytes=50_000)
    for f in "abcd":  # 20,000 bytes each: two fit
        cache.get(("t", f), 20_000, lambda: np.zeros((1, 100, 100), np.uint16))
    assert [k[1] for k in cache._data] == ["c", "d"]  # the least recently used went first


def _local_client():
    from distributed import Client, LocalCluster

    # two threads, as a local CPU worker has at least: one may wait on a feeder while the other embeds
    cluster = LocalCluster(n_workers=1, threads_per_worker=2, processes=False, dashboard_address=":0")
    return cluster, Client(cluster)


def test_embedding_starts_before_the_last_field_is_searched(tiny_plate, tmp_path, monkeypatch):
    log = tmp_path / "log.txt"  # tasks are pickled on their way to the worker: a file, not a list, sees them all
    real_cells, real_embed = PlateSource.cells_and_crops, pipeline._embed_block

    def note(event: str) -> None:  # feeder processes write here too: a file, in append mode
        with open(log, "a") as f:
            f.write(f"{event} {time.perf_counter()}\n")

    def cells_and_crops(self, part, alloc=np.empty):
        out = real_cells(self, part, alloc)
        if part != self.fields[0]:
            time.sleep(1.0)  # the other fields take a while: the first field's blocks need not wait for them
        note("found")
        return out

    def embed(crops, spec):
        note("embed")
        return real_embed(crops, spec)

    monkeypatch.setattr(PlateSource, "cells_and_crops", cells_and_crops)
    monkeypatch.setattr(pipeline, "_embed_block", embed)
    cfg = RunConfig(tiny_plate, str(tmp_path / "o.zarr"), "random:vit_test8", OPTS, input_size=32, chunk_cells=2)
    cluster, client = _local_client()
    with cluster, client, client.as_current():
        res = run(replace(cfg, progress=False))
    events = [line.split() for line in log.read_text().splitlines()]
    found = [float(t) for e, t in events if e == "found"]
    embeds = [float(t) for e, t in events if e == "embed"]
    assert len(found) == 3 and len(embeds) == 5 == -(-res.n_cells // 2)
    assert min(embeds) < max(found)  # the first field's blocks ran while the others were still to be searched


def test_a_run_stopped_while_cells_are_found_resumes_to_the_same_embeddings(tiny_plate, tmp_path, monkeypatch, caplog):
    """Stopped before the cell table is written (some blocks already are), the rerun finds the cells again, skips
    the blocks done, and ends with the embeddings of an uninterrupted run, bit for bit."""
    ref, out = tmp_path / "ref.zarr", tmp_path / "o.zarr"
    cfg = RunConfig(tiny_plate, str(ref), "random:vit_test8", OPTS, input_size=32, chunk_cells=2, progress=False)
    full = run(cfg)
    real = output_mod.EmbeddingStore.write_table

    def stop(self, table, counts=None):
        raise KeyboardInterrupt  # Ctrl-C as the last field's cells arrive

    real_cells = PlateSource.cells_and_crops

    def last_field_slow(self, part, alloc=np.empty):
        if part == self.fields[-1]:
            time.sleep(1.0)  # the first fields' blocks are written meanwhile
        return real_cells(self, part, alloc)

    monkeypatch.setattr(output_mod.EmbeddingStore, "write_table", stop)
    monkeypatch.setattr(PlateSource, "cells_and_crops", last_field_slow)
    cluster, client = _local_client()
    with cluster, client, client.as_current():
        with pytest.raises(KeyboardInterrupt):
            run(replace(cfg, out=str(out)))
    st = output_mod.store_status(str(out))
    assert st["status"] == "running" and st["table"] is False
    done = int(output_mod.EmbeddingStore(str(out)).done().sum())
    assert 0 < done < full.blocks_run
    monkeypatch.setattr(output_mod.EmbeddingStore, "write_table", real)
    with caplog.at_level(logging.DEBUG, logger="scdino.engine.stream"):
        again = run(replace(cfg, out=str(out)))
    assert again.resumed and again.blocks_run == full.blocks_run - done
    # the crops of the blocks found done again were let go as they were skipped, not held to the end
    assert "parts whose crops were still held at the end: 0" in caplog.messages
    a, b = ad.read_zarr(ref), ad.read_zarr(out)
    assert list(a.obs_names) == list(b.obs_names)
    pd.testing.assert_frame_equal(a.obs, b.obs)
    np.testing.assert_array_equal(a.obsm["X_scdino"], b.obsm["X_scdino"])
