"""The embedding stream of ``scdino-engine run``: cells are found part by part (a plate's fields) as Dask tasks, and
each block of cells is submitted the moment its rows are known, so that finding cells and embedding them overlap.

* **Tasks.** Finding a part's cells is one task (:func:`scdino.engine.feed.find_part`): a source that cuts crops as it
  finds cells (``cells_and_crops``) does both from one decode of the part, in a feeder process of the worker
  (:mod:`scdino.engine.feed`: outside the worker's interpreter lock), and the worker keeps the crops until its blocks
  are embedded. Embedding a run of store blocks is one task (:func:`read_and_embed`): it takes the crops the worker
  holds (or reads them, in a feeder), and holds the worker's model for inference only (one inference at a time per
  process). Embedding tasks go before finding tasks (a higher priority) and run on the worker that holds their crops.
* **Sizes.** A task embeds ``group`` store blocks: one on a CPU, where a block is many seconds of model time, and
  enough on a GPU (or with the null backend) for about four batches, so that the per-task cost of Dask is a small
  part of a task. At most ``window`` embedding tasks are in flight: twice the cluster's threads, fewer where their
  raw crops would not fit a memory budget per worker (:data:`MEMORY_PER_WORKER`). Parts are searched at most
  ``parts`` at a time (a thread per worker is always left for embedding), and none is started while the crops found and not yet embedded exceed ``held`` cells (one
  window of tasks); finished embeddings wait for the writer at most a window deep. A plate of any size holds a
  bounded number of crops and embeddings.
* **Writes** go through one writer thread, in the order they were asked for (grow the store, write blocks, write the
  table), so that the client submits the next task at once; the first failed write stops the writes after it.
* **Resume.** Blocks already done are never submitted again; a store whose cell table was not yet written (the run
  stopped while cells were being found) has its cells found again, in the same order (finding is deterministic).
"""

from __future__ import annotations

import bisect
import logging
import threading
import time
import uuid
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd

from scdino.cells.source import CellSource
from scdino.engine import feed
from scdino.engine.backends import BackendSpec, using
from scdino.engine.backends.base import entry_of
from scdino.engine.output import EmbeddingStore, field_counts
from scdino.errors import OutputError
from scdino.progress import Progress

log = logging.getLogger(__name__)

#: memory a worker may spend on the crops and model inputs of its tasks in flight
MEMORY_PER_WORKER = 1536 << 20
#: cells per task on a GPU (or with the null backend): about four batches, within these bounds
GPU_TASK_CELLS = (2048, 8192)
#: cells given to ``first_rows``
FIRST_ROWS = 256

_INFER: dict[BackendSpec, threading.Lock] = {}
_INFER_GUARD = threading.Lock()


def _infer_lock(spec: BackendSpec) -> threading.Lock:
    with _INFER_GUARD:
        return _INFER.setdefault(spec, threading.Lock())


def embed_block(crops: np.ndarray, spec: BackendSpec) -> np.ndarray:
    """Raw crops -> embeddings with this process's backend for ``spec``, one inference at a time per process. A
    backend that can ``launch`` a block without waiting for it (a GPU's) holds the model only while it launches, so
    the next block is launched while the device still runs this one. With test-time augmentation, the mean over the
    transforms of the crops (:mod:`scdino.engine.tta`), on whichever backend runs."""
    if spec.tta != "none":
        from scdino.engine.tta import averaged

        return averaged(crops, spec.tta, lambda x: _embed_once(x, spec))
    return _embed_once(crops, spec)


def _embed_once(crops: np.ndarray, spec: BackendSpec) -> np.ndarray:
    with using(spec) as backend:
        launch = getattr(backend, "launch", None)
        with _infer_lock(spec):
            wait = launch(crops) if launch is not None else None
            if wait is None:
                return backend.infer(crops)
        return wait()


def read_and_embed(
    source: CellSource, rows: pd.DataFrame | None, spec: BackendSpec, embed: Callable = embed_block, key: str = "",
    pieces: Sequence[feed.Piece] = (), feeders: int = 0,
) -> np.ndarray:  # fmt: skip
    """Dask task: the embeddings of ``rows``, their crops taken from this worker (the ``pieces`` of the parts it
    found) or read (``rows`` None: every piece is held by this worker)."""
    crops = feed.gather(source, rows, key, pieces, feeders, getattr(source, "read_unit", ()))
    try:
        return embed(crops, spec)
    finally:
        feed.release(key, pieces)


@dataclass(frozen=True)
class StreamPlan:
    """How a run is cut into tasks: store blocks of ``chunk`` cells, ``group`` blocks per task, at most ``window``
    embedding tasks and ``parts`` finding tasks in flight, no new part while more than ``held`` cells found wait for
    the model; ``feeders`` processes per worker find cells and cut crops (0: the worker's threads do)."""

    chunk: int
    group: int
    window: int
    parts: int = 2
    held: int = 1 << 30
    feeders: int = 0
    #: tasks carry their rows even where a worker holds their crops: a cluster of several workers, or one that others
    #: may join (Dask moves tasks between workers; one that moved reads its crops)
    rows_always: bool = True


def stream_plan(
    spec: BackendSpec, source: CellSource, chunk: int, workers: int, threads: int, feeders: int | None = None,
    fixed: bool = False,
) -> StreamPlan:  # fmt: skip
    """The :class:`StreamPlan` for ``spec`` on a cluster of ``workers`` workers with ``threads`` threads in all;
    ``feeders`` per worker (None: one per core of a worker, where feeder processes can run); ``fixed``: a cluster no
    worker joins (this command's own)."""
    if spec.device not in entry_of(spec.kind).grouped_on:
        group = 1
    else:
        lo, hi = GPU_TASK_CELLS
        group = max(1, min(hi, max(lo, 4 * spec.batch_size)) // chunk)
    # a task in flight holds its raw crops; a model input is made one batch at a time, by one task per worker
    cell = len(source.channels) * source.crop_size**2 * np.dtype(source.dtype).itemsize
    per_task = group * chunk * cell
    fits = max(1, workers * MEMORY_PER_WORKER // per_task)
    if feeders is None:
        feeders = feed.default_feeders(max(1, threads // max(1, workers)))
    window = int(max(1, min(fits, 2 * threads)))
    # found crops wait in the workers: enough to fill the window (the model never waits on finding), never more than
    # the memory budget, and never less than two tasks' worth
    held = max(2 * group * chunk, min(window * group * chunk, workers * MEMORY_PER_WORKER // cell))
    # two parts per feeder, but never every thread: a worker keeps at least one thread free for embedding (a thread
    # that waits on a feeder cannot run the first field's blocks while the others are searched)
    parts = max(1, min(2 * max(1, feeders) * workers, threads - workers))
    return StreamPlan(chunk, group, window, parts, held, feeders, rows_always=not (fixed and workers == 1))


class Writer:
    """One thread that does the store's writes in order; after a failed write it does nothing more, and
    :meth:`check` raises that failure in the caller's thread."""

    def __init__(self) -> None:
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="scdino-writer")
        self.failed: BaseException | None = None
        self.futures: list[Future] = []

    def __call__(self, fn: Callable, *args) -> Future:
        def guarded():
            if self.failed is None:
                try:
                    fn(*args)
                except BaseException as exc:  # a write that failed (or Ctrl-C): nothing after it is written
                    self.failed = exc
                    raise

        fut = self.pool.submit(guarded)
        self.futures.append(fut)
        return fut

    def check(self) -> None:
        self.futures = [f for f in self.futures if not f.done()]
        if self.failed is not None:
            raise self.failed

    def wait_below(self, n: int) -> None:
        """Wait until fewer than ``n`` writes are queued (the caller's work outruns the store: results would pile up
        in memory)."""
        self.check()
        while len(self.futures) >= n:
            wait(self.futures, return_when=FIRST_COMPLETED)
            self.check()

    def close(self) -> None:
        self.pool.shutdown(wait=True)
        self.check()


class Rows:
    """The cell table as parts arrive (in any order): the rows known so far are those of the parts before the first
    part still missing."""

    def __init__(self, n_parts: int) -> None:
        self.parts: list[pd.DataFrame | None] = [None] * n_parts
        self.ends: list[int] = []  # cumulative row counts of the known prefix of parts
        self.known = 0
        self.table: pd.DataFrame | None = None  # all parts' rows, once every part is known (settle)

    @property
    def complete(self) -> bool:
        return len(self.ends) == len(self.parts)

    def add(self, i: int, table: pd.DataFrame) -> None:
        self.parts[i] = table
        while len(self.ends) < len(self.parts) and self.parts[len(self.ends)] is not None:
            self.known += len(self.parts[len(self.ends)])
            self.ends.append(self.known)

    def pieces(self, a: int, b: int) -> list[feed.Piece]:
        """Rows ``a:b`` of the table (within the known prefix) as pieces of parts: (part, rows in the part, rows in
        ``a:b``)."""
        out, i, lo = [], bisect.bisect_right(self.ends, a), a
        while a < b:
            start = self.ends[i - 1] if i else 0
            stop = min(b, self.ends[i])
            if stop > a:
                out.append(feed.Piece(i, a - start, stop - start, a - lo, stop - lo))
            a, i = max(a, stop), i + 1
        return out

    def settle(self, table: pd.DataFrame) -> None:
        """Every part is known and ``table`` is their rows in order: rows are read from it from now on, and the parts'
        own tables go (a large plate's cell table is not held twice)."""
        self.table = table
        self.parts = [None] * len(self.parts)

    def rows(self, a: int, b: int, columns: list[str]) -> pd.DataFrame:
        """Rows ``a:b`` of the table (within the known prefix), ``columns`` only."""
        if self.table is not None:
            return self.table.iloc[a:b][columns].reset_index(drop=True)
        out, i = [], bisect.bisect_right(self.ends, a)
        while a < b:
            start = self.ends[i - 1] if i else 0
            stop = min(b, self.ends[i])
            if stop > a:
                out.append(self.parts[i].iloc[a - start : stop - start][columns])
            a, i = max(a, stop), i + 1
        return pd.concat(out, ignore_index=True) if len(out) != 1 else out[0].reset_index(drop=True)


def run_stream(
    client, source: CellSource, spec: BackendSpec, store: EmbeddingStore | Callable[[], EmbeddingStore],
    table: pd.DataFrame | None, plan: StreamPlan,
    progress: bool = True, embed: Callable = embed_block, first_rows: Callable[[pd.DataFrame], Any] | None = None,
) -> tuple[EmbeddingStore, pd.DataFrame, int, dict[str, float]]:  # fmt: skip
    """Find the cells of ``source`` (unless ``table`` is given), embed every block ``store`` lacks and write it.
    ``store`` may be a function that makes it: it is called once the first cells are known (a source with no cell
    at all makes none). Returns the store, the cell table, the blocks run and the phases' seconds (until every cell
    was found; making the store). ``first_rows`` is called once with the first cells found (at most
    :data:`FIRST_ROWS`, the source's read columns)."""
    stream = _Stream(client, source, spec, store, plan, progress, embed)
    stream.first_rows = first_rows
    try:
        return stream.run(table)
    finally:
        stream.close()


class _Stream:
    def __init__(self, client, source, spec, store, plan, progress, embed) -> None:
        from distributed import as_completed

        self.client, self.source, self.spec, self.store, self.plan = client, source, spec, store, plan
        # the source and the spec go to each worker once, not with every task (a plate's source pickles its fields:
        # 4 ms a task for 245 fields, most of the client's time per task)
        self.source_f = client.scatter(source, broadcast=True, hash=False)
        self.spec_f = client.scatter(spec, broadcast=True, hash=False)
        self.embed, self.progress = embed, progress
        self.cols = list(source.read_columns)
        self.key = uuid.uuid4().hex  # names this run's crops held by the workers
        self.make_store = None if isinstance(store, EmbeddingStore) else store
        self.store = store if self.make_store is None else None
        self.done = self.store.done() if self.store is not None else np.zeros(0, bool)
        self.capacity = self.store.n if self.store is not None else 0
        self.making = False
        self.phases: dict[str, float] = {}
        self.events = as_completed(loop=client.loop, with_results=True)  # the run's client, not the default one
        self.futures: dict[str, tuple[Any, str, Any]] = {}  # key -> (future, "part", i) or (future, "blocks", (i, j))
        self.writer = Writer()
        self.next_block = 0  # the first block not yet submitted (or skipped as done)
        self.in_flight = 0
        self.blocks_run = 0
        self.t0 = time.perf_counter()
        self.found_s = 0.0
        self.bar: Progress | None = None
        self.counted = 0
        self.first_rows: Callable | None = None
        self.holder: dict[int, str | None] = {}  # part -> the worker holding its crops (None: not held)
        self.next_part = 0
        self.parts_in_flight = 0
        self.waiting = 0  # cells found and not yet embedded (or found done)
        self.counts: list[dict[str, Any]] = []  # per field: its keys, cells found and embedded (uns["fields"])

    def run(self, table: pd.DataFrame | None) -> tuple[pd.DataFrame, int, dict[str, float]]:
        self.parts = [None] if table is not None else list(self.source.parts)
        self.rows = Rows(len(self.parts))
        self.fields = Progress(len(self.parts), "finding cells", "field", self.progress and table is None)
        if table is not None:
            self.next_part = 1
            self._found(0, table)
        else:
            self._submit_parts()
        for fut, result in self.events:
            _, what, where = self.futures.pop(fut.key)
            fut.release()
            if what == "part":
                found, self.holder[where] = result
                self.parts_in_flight -= 1
                self._found(where, found)
            elif what == "blocks":
                self._embedded(where, result)
            self._submit_parts()
            self.writer.check()
        self.writer.close()
        self.bar.close()
        return self.store, self.table, self.blocks_run, {**self.phases, "find_cells_seconds": self.found_s}

    def _submit_parts(self) -> None:
        """Start finding the next parts, in order, while few enough are searched and their crops would fit."""
        plan = self.plan
        while self.next_part < len(self.parts) and self.parts_in_flight < plan.parts:
            if self.waiting >= plan.held and (self.parts_in_flight or self.in_flight):
                return  # the model catches up first (it frees crops; nothing waits on a part not yet started)
            i = self.next_part
            fut = self.client.submit(
                feed.find_part, self.source_f, self.parts[i], self.key, i, plan.feeders, pure=False, priority=0
            )
            self.futures[fut.key] = (fut, "part", i)
            self.events.add(fut)
            self.next_part += 1
            self.parts_in_flight += 1

    def _count(self, i: int, part: pd.DataFrame) -> None:
        """Count a part's cells found and kept; a field whose found cells were all dropped is named."""
        if "keys" not in part.attrs:  # a cell table read back from a resumed store: counted by the run that wrote it
            return
        self.counts.append({**part.attrs, "part": i, "embedded": len(part)})
        if part.attrs["found"] and not len(part):
            name = "/".join(str(v) for v in part.attrs["keys"].values())
            why = part.attrs.get("dropped") or "none was kept"
            log.warning("%s: all %d cells found there were dropped: %s", name, part.attrs["found"], why)

    def _found(self, i: int, part: pd.DataFrame) -> None:
        self._count(i, part)
        had = self.rows.known
        self.rows.add(i, part)
        self.waiting += len(part)
        self.fields.update(1)
        if self.rows.complete:
            self.fields.close()
            self.found_s = time.perf_counter() - self.t0
            if self.plan.feeders and not self.plan.rows_always:
                # every field is found and its crops are in this worker: the feeders' memory goes now, before the
                # cell table is put together and written (a worker that needs one again starts it again)
                self.client.run(feed.stop_feeders)
            self.table = self.source.combine(self.rows.parts)  # an error when no part has a cell
            self.rows.settle(self.table)
        elif not self.rows.known:
            return
        if self.store is None and not self.making:
            self.making = True
            self.writer(self._make_store)  # the writer makes it: the first blocks are submitted meanwhile
        if self.rows.complete:
            if self.store is not None and self.store.has_table and self.store.n != len(self.table):
                raise OutputError(f"{self.store.path}: holds {self.store.n} cells, the source has {len(self.table)}")
            self.writer(self._finish_table)
        elif self.rows.known > self.capacity:  # room for twice as many: a few resizes for a plate of any size
            self.capacity = max(self.rows.known, 2 * self.capacity)
            self.writer(lambda n=self.capacity: self.store.grow(n))
        self._submit()
        if self.first_rows is not None and had == 0:
            self.first_rows(self.rows.rows(0, min(self.rows.known, FIRST_ROWS), self.cols))

    def _make_store(self) -> None:
        t = time.perf_counter()
        self.store = self.make_store()
        self.phases["store_seconds"] = time.perf_counter() - t

    def _finish_table(self) -> None:
        self.store.resize(len(self.table))  # the room grown ahead of the cells found goes
        if not self.store.has_table:
            self.store.write_table(self.table, field_counts(sorted(self.counts, key=lambda c: c["part"])))

    def _write_blocks(self, i: int, emb: np.ndarray) -> None:
        self.store.write_blocks(i, emb)
        self.bar.update(len(emb))

    def _placement(self, pieces: list[feed.Piece]) -> dict[str, Any]:
        """Where a task on ``pieces`` should run: the worker that holds most of their crops (any worker where that
        one is gone; anywhere when no worker holds them)."""
        held = [(p.b - p.a, self.holder.get(p.part)) for p in pieces if self.holder.get(p.part)]
        if not held:
            return {}
        return {"workers": [max(held, key=lambda h: h[0])[1]], "allow_other_workers": True}

    def _skip(self, i: int, known: int) -> None:
        """Block ``i`` is done already (a resumed run finding its cells again): its crops are let go."""
        chunk = self.plan.chunk
        a, b = i * chunk, min(known, (i + 1) * chunk)
        pieces = self.rows.pieces(a, b)
        self.waiting -= b - a
        if any(self.holder.get(p.part) is not None for p in pieces):  # a worker holds their crops (maybe ours: "")
            # kept in futures until it ran: a future let go of may be cancelled before it runs
            fut = self.client.submit(feed.release, self.key, pieces, pure=False, priority=2, **self._placement(pieces))
            self.futures[fut.key] = (fut, "release", None)
            self.events.add(fut)

    def _submit(self) -> None:
        """Submit the blocks whose rows are all known, up to the window."""
        chunk, known = self.plan.chunk, self.rows.known
        last = -(-known // chunk) if self.rows.complete else known // chunk  # blocks whose rows are all known
        if self.bar is None and (known or self.rows.complete):
            done = [i for i in range(min(len(self.done), last)) if self.done[i]]
            skipped = sum(min(known, (i + 1) * chunk) - i * chunk for i in done)
            growing = not self.rows.complete
            self.bar = Progress(known, "embedding", "cell", self.progress, initial=skipped, growing=growing)
            self.counted = last  # done blocks before it are counted in the bar's start
        elif self.bar is not None and (self.bar.growing or known != self.bar.total):
            self.bar.set_total(known, final=self.rows.complete)
        while self.in_flight < self.plan.window and self.next_block < last:
            i = self.next_block
            if i < len(self.done) and self.done[i]:
                if i >= self.counted:  # found done only now (a resumed run finding its cells again)
                    self.writer(self.bar.update, min(known, (i + 1) * chunk) - i * chunk)
                self._skip(i, known)
                self.next_block += 1
                continue
            j = i + 1
            while j < min(last, i + self.plan.group) and not (j < len(self.done) and self.done[j]):
                j += 1
            a, b = i * chunk, min(j * chunk, known)
            pieces = self.rows.pieces(a, b)
            # rows only where some crops may not be held where the task runs: a run resumed from a store with its cell
            # table, or a cluster of several workers (a block's parts may have been found by two; a task may move)
            held = all(self.holder.get(p.part) is not None for p in pieces)
            rows = None if held and not self.plan.rows_always else self.rows.rows(a, b, self.cols)
            fut = self.client.submit(
                read_and_embed, self.source_f, rows, self.spec_f, self.embed, self.key, pieces, self.plan.feeders,
                pure=False, priority=1, **self._placement(pieces),
            )  # fmt: skip
            self.futures[fut.key] = (fut, "blocks", (i, j, b - a))
            self.events.add(fut)
            self.in_flight += 1
            self.next_block = j

    def _embedded(self, blocks: tuple[int, int, int], emb: np.ndarray) -> None:
        i, j, n = blocks
        self.writer(self._write_blocks, i, emb)
        # embeddings wait in the writer's queue at most a window's worth: past that the store sets the pace (a 1M-cell
        # plate's finished blocks would otherwise pile up in memory while the store catches up)
        self.writer.wait_below(self.plan.window + 1)
        self.in_flight -= 1
        self.waiting -= n
        self.blocks_run += j - i
        self._submit()

    def close(self) -> None:
        for fut, _, _ in self.futures.values():  # what is still queued after a failure or an interruption
            fut.cancel()
        for fut in (self.source_f, self.spec_f):
            fut.release()
        self.writer.pool.shutdown(wait=True)
        try:  # crops a worker still holds for this run (after a failure: the blocks that never ran)
            left = sum(self.client.run(feed.forget, self.key).values())
            log.debug("parts whose crops were still held at the end: %d", left)
        except Exception as exc:  # the cluster went away with the failure: nothing is held then
            log.debug("could not free the run's crops on the workers: %s", exc)
        for bar in (self.fields, self.bar):
            if bar is not None:
                bar.close()
