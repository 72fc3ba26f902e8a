"""Feeder processes: jobs run in forked processes, arrays come back through shared memory, errors come back as they
were raised, a feeder that dies is named; the engine's tasks take held crops and read the rest."""

import os
import signal
import time

import numpy as np
import pandas as pd
import pytest

from scdino.cells.options import CellOptions
from scdino.cells.source import open_source
from scdino.engine import feed
from scdino.errors import InputError

pytestmark = pytest.mark.skipif(not feed.supported(), reason="feeder processes need Linux (fork, memfd)")


def _pid_and_array(n: int) -> tuple[int, np.ndarray]:
    arr = feed.shared_empty((n, 3, 32, 32), np.uint16)
    arr[...] = np.arange(arr.size, dtype=np.uint64).reshape(arr.shape) % 65521  # a prime: no accidental match
    return os.getpid(), arr


def _raise(message: str) -> None:
    raise InputError(message)


def _exit_hard() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _kept_len(obj) -> int:
    return len(obj)


def _small(n: int) -> np.ndarray:
    return np.full(n, 7, np.int32)


@pytest.fixture
def pool():
    p = feed.Feeders(2)
    yield p
    p.close()


def test_a_job_runs_in_another_process_and_its_array_comes_back_through_shared_memory(pool):
    pid, arr = pool.call(_pid_and_array, 400)  # 400 x 3 x 32 x 32 x 2 bytes = 2.4 MB: shared, not pickled
    assert pid != os.getpid() and pid in {c.pid for c in pool.children}
    expect = np.arange(arr.size, dtype=np.uint64).reshape(arr.shape) % 65521  # worked out here, independently
    np.testing.assert_array_equal(arr, expect)
    assert isinstance(arr.base, memoryview) or arr.base is not None  # a view of a mapping, not a pickled copy
    assert feed.SHARE_MIN <= arr.nbytes
    assert np.array_equal(pool.call(_small, 5), [7] * 5)  # small arrays are pickled with the result


def test_the_error_of_a_job_is_raised_in_the_caller_as_it_was_raised(pool):
    with pytest.raises(InputError, match="plate.zarr/A/1/0: bad pixels"):
        pool.call(_raise, "plate.zarr/A/1/0: bad pixels")
    assert pool.call(_small, 2).tolist() == [7, 7]  # the feeder serves on


def test_a_feeder_that_dies_is_named_with_how_it_ended(pool):
    with pytest.raises(feed.FeederDied, match=r"ended \(signal 9\).*out of memory"):
        pool.call(_exit_hard)
    assert pool.closed


def test_a_kept_argument_is_sent_once_per_feeder_and_replaced_by_the_next(pool):
    big = list(range(1000))
    assert pool.call(_kept_len, feed.Kept("run-1", big), affinity=0) == 1000
    assert pool.children[0].kept == "run-1"
    # the same key again: only the key travels, the feeder answers from what it kept
    assert pool.call(_kept_len, feed.Kept("run-1", ["not", "sent"]), affinity=0) == 1000
    assert pool.call(_kept_len, feed.Kept("run-2", [1, 2]), affinity=0) == 2  # a new run replaces it


def test_feeders_end_when_their_parent_closes_them(pool):
    pids = [c.pid for c in pool.children]
    pool.close()
    for pid in pids:
        with pytest.raises(ProcessLookupError):  # reaped: no such process
            os.kill(pid, 0)


def test_two_threads_use_two_feeders_at_once(pool):
    from concurrent.futures import ThreadPoolExecutor

    def sleepy(_):
        return pool.call(time.sleep, 0.5)

    t = time.perf_counter()
    with ThreadPoolExecutor(2) as ex:
        list(ex.map(sleepy, range(2)))
    assert time.perf_counter() - t < 0.95  # two half-second jobs side by side, not one after the other


def _old_cut(field: np.ndarray, y0s, x0s, crop: int) -> np.ndarray:
    """Crops cut one by one with zero padding, written from the definition (independent of cut_crops)."""
    c, h, w = field.shape
    m = crop + 4  # a margin wider than any window that leaves the field
    pad = np.zeros((c, h + 2 * m, w + 2 * m), field.dtype)
    pad[:, m : m + h, m : m + w] = field
    return np.stack([pad[:, y + m : y + m + crop, x + m : x + m + crop] for y, x in zip(y0s, x0s)])


def test_cells_and_crops_equal_finding_then_cutting_each_crop(tiny_plate):
    src = open_source(tiny_plate, CellOptions(labels="nuclei", crop_size=24))
    for part in src.parts:
        table, crops = src.cells_and_crops(part)
        pd.testing.assert_frame_equal(table, src.cells_of(part))
        field = src.plate.read(part, list(src.channels))
        want = _old_cut(field, table["crop_y0"], table["crop_x0"], 24)
        np.testing.assert_array_equal(crops, want)


def test_the_engine_tasks_take_held_crops_once_and_read_the_rest(tiny_plate, pool, monkeypatch):
    src = open_source(tiny_plate, CellOptions(labels="nuclei", crop_size=24))
    monkeypatch.setattr(feed, "_POOL", pool)
    key = "run"
    t0, a0 = feed.find_part(src, src.parts[0], key, 0, pool.n)
    t1, _ = feed.find_part(src, src.parts[1], key, 1, pool.n)
    assert a0 == ""  # held, by no Dask worker (none here)
    assert set(feed.HELD) == {(key, 0), (key, 1)}
    n0, n1 = len(t0), len(t1)
    both = pd.concat([t0, t1], ignore_index=True)
    assert n0 >= 3 and n1 >= 2
    # a block across the two parts: the last 2 rows of part 0 and the first of part 1
    rows = both.iloc[n0 - 2 : n0 + 1].reset_index(drop=True)
    pieces = [feed.Piece(0, n0 - 2, n0, 0, 2), feed.Piece(1, 0, 1, 2, 3)]
    got = feed.gather(src, rows, key, pieces, pool.n, src.read_unit)
    np.testing.assert_array_equal(got, src.read(rows))
    feed.release(key, pieces)
    assert feed.HELD[(key, 0)].left == n0 - 2 and feed.HELD[(key, 1)].left == n1 - 1
    # what is not held (another run's key) is read, in a feeder
    other = feed.gather(src, rows, "other-run", pieces, pool.n, src.read_unit)
    np.testing.assert_array_equal(other, got)
    # the rest of both parts: freed once every row was taken
    feed.release(key, [feed.Piece(0, 0, n0 - 2, 0, 0), feed.Piece(1, 1, n1, 0, 0)])
    assert not [k for k in feed.HELD if k[0] == key]
    feed.find_part(src, src.parts[2], key, 2, pool.n)
    assert feed.forget(key) == 1 and not feed.HELD


def test_without_feeders_the_same_tasks_run_in_this_process(tiny_plate, monkeypatch):
    src = open_source(tiny_plate, CellOptions(labels="nuclei", crop_size=24))
    monkeypatch.setattr(feed, "supported", lambda: False)
    assert feed.feeders(2) is None and feed.default_feeders(4) == 0
    table, _ = feed.find_part(src, src.parts[0], "k", 0, 2)
    rows = table.iloc[:3]
    got = feed.gather(src, rows, "k", [feed.Piece(0, 0, 3, 0, 3)], 2, src.read_unit)
    np.testing.assert_array_equal(got, src.read(rows))
    assert feed.forget("k") == 1


def test_cut_crops_matches_cutting_each_window_from_a_zero_padded_field():
    from scdino.cells.table import cut_crops

    rng = np.random.default_rng(0)
    for trial in range(40):  # windows inside, across the border and wholly outside; rows in any order
        h, w = (int(v) for v in rng.integers(20, 70, 2))
        crop, c = int(rng.integers(4, 20)), int(rng.integers(1, 4))
        field = rng.integers(0, 60000, (c, h, w)).astype(np.uint16)
        n = int(rng.integers(1, 25))
        y0s, x0s = rng.integers(-crop - 2, h + 2, n), rng.integers(-crop - 2, w + 2, n)
        idx = rng.permutation(n + 4)[:n]
        out = np.full((n + 4, c, crop, crop), 9, np.uint16)  # anything before: every pixel of out[idx] is written
        cut_crops(field, (0, 0), (h, w), y0s, x0s, out, idx)
        np.testing.assert_array_equal(out[idx], _old_cut(field, y0s, x0s, crop), err_msg=f"trial {trial}")
        assert (np.delete(out, idx, axis=0) == 9).all()  # other rows untouched
        # from a region of the field (its corner at ry0, rx0) holding every window's pixels inside the field
        ry0, rx0 = int(max(0, y0s.min())), int(max(0, x0s.min()))
        region = field[:, ry0:, rx0:]
        out2 = np.full((n, c, crop, crop), 9, np.uint16)
        cut_crops(region, (ry0, rx0), (h, w), y0s, x0s, out2, np.arange(n))
        np.testing.assert_array_equal(out2, _old_cut(field, y0s, x0s, crop), err_msg=f"region, trial {trial}")


def _filled(n: int, value: int) -> np.ndarray:
    arr = feed.shared_empty((n, 3, 32, 32), np.uint16)
    arr[...] = value
    return arr


def test_a_feeder_reuses_a_buffer_only_once_its_parent_let_go_of_it():
    import gc

    pool = feed.Feeders(1)
    try:
        child = pool.children[0]
        kept = pool.call(_filled, 400, 1)  # held by this process: its buffer stays the parent's
        again = pool.call(_filled, 400, 2)  # so the feeder writes a second one
        assert len(child.maps) == 2 and (kept == 1).all() and (again == 2).all()
        view = kept[10:20]
        del kept, again
        gc.collect()
        third = pool.call(_filled, 400, 3)  # the second buffer is free again (nothing reads it): reused
        assert len(child.maps) == 2 and (third == 3).all()
        assert (view == 1).all()  # the first is still read through a view: never written
        del view, third
        gc.collect()
        for v in (4, 5, 6):  # both free: no new buffer, whatever the order
            assert (pool.call(_filled, 400, v) == v).all()
        assert len(child.maps) == 2
        # a larger array does not fit: the free buffers are closed, the feeder says so, this process unmaps them
        big = pool.call(_filled, 1200, 7)
        assert (big == 7).all() and len(child.maps) == 1
    finally:
        pool.close()
