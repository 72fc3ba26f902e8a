"""The embedding stream of ``scdino-engine run``: cells are found part by part (a plate's fields) as Dask tasks, and
each block of cells is submitted the moment its rows are known, so that finding cells and embedding them overlap.

* **Tasks.** Finding a part's cells is one task (:meth:`CellSource.cells_of`); reading and embedding a run of store
  blocks is one task (:func:`read_and_embed`), which reads its crops on any thread of a worker and holds the worker's
  model for inference only (one inference at a time per process: the model uses the worker's cores), so a worker's
  other threads read, cut and find cells meanwhile. Embedding tasks go before finding tasks (a higher priority):
  whatever cells are known are embedded first, and idle threads find more.
* **Sizes.** A task embeds ``group`` store blocks: one on a CPU, where a block is many seconds of model time, and
  enough on a GPU (or with the null backend) for about four batches, so that the per-task cost of Dask is a small
  part of a task. At most ``window`` tasks are in flight: twice the cluster's threads, fewer where their raw crops
  would not fit a memory budget per worker (:data:`MEMORY_PER_WORKER`; a model input is made one batch at a time,
  by the one task per worker that holds the model).
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
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import pandas as pd

from scdino.cells.source import CellSource
from scdino.engine.backends import BackendSpec, using
from scdino.engine.output import EmbeddingStore
from scdino.errors import OutputError
from scdino.progress import Progress

log = logging.getLogger(__name__)

#: memory a worker may spend on the crops and model inputs of its tasks in flight
MEMORY_PER_WORKER = 1536 << 20
#: cells per task on a GPU (or with the null backend): about four batches, within these bounds
GPU_TASK_CELLS = (1024, 4096)
#: cells given to ``first_rows``
FIRST_ROWS = 256

_INFER: dict[BackendSpec, threading.Lock] = {}
_INFER_GUARD = threading.Lock()


def _infer_lock(spec: BackendSpec) -> threading.Lock:
    with _INFER_GUARD:
        return _INFER.setdefault(spec, threading.Lock())


def embed_block(crops: np.ndarray, spec: BackendSpec) -> np.ndarray:
    """Raw crops -> embeddings with this process's backend for ``spec``, one inference at a time per process."""
    with using(spec) as backend, _infer_lock(spec):
        return backend.infer(crops)


def read_and_embed(source: CellSource, rows: pd.DataFrame, spec: BackendSpec, embed: Callable = embed_block):
    """Dask task: the embeddings of ``rows`` (their crops read by ``source``)."""
    return embed(source.read(rows), spec)


@dataclass(frozen=True)
class StreamPlan:
    """How a run is cut into tasks: store blocks of ``chunk`` cells, ``group`` blocks per task, at most ``window``
    tasks in flight."""

    chunk: int
    group: int
    window: int


def stream_plan(spec: BackendSpec, source: CellSource, chunk: int, workers: int, threads: int) -> StreamPlan:
    """The :class:`StreamPlan` for ``spec`` on a cluster of ``workers`` workers with ``threads`` threads in all."""
    if spec.device == "cpu" and spec.kind != "null":
        group = 1
    else:
        lo, hi = GPU_TASK_CELLS
        group = max(1, min(hi, max(lo, 4 * spec.batch_size)) // chunk)
    # a task in flight holds its raw crops; a model input is made one batch at a time, by one task per worker
    per_task = group * chunk * len(source.channels) * source.crop_size**2 * np.dtype(source.dtype).itemsize
    fits = max(1, workers * MEMORY_PER_WORKER // per_task)
    return StreamPlan(chunk, group, int(max(1, min(fits, 2 * threads))))


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

    @property
    def complete(self) -> bool:
        return len(self.ends) == len(self.parts)

    def add(self, i: int, table: pd.DataFrame) -> None:
        self.parts[i] = table
        while len(self.ends) < len(self.parts) and self.parts[len(self.ends)] is not None:
            self.known += len(self.parts[len(self.ends)])
            self.ends.append(self.known)

    def rows(self, a: int, b: int, columns: list[str]) -> pd.DataFrame:
        """Rows ``a:b`` of the table (within the known prefix), ``columns`` only."""
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
        self.embed, self.progress = embed, progress
        self.cols = list(source.read_columns)
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

    def run(self, table: pd.DataFrame | None) -> tuple[pd.DataFrame, int, dict[str, float]]:
        parts = [None] if table is not None else list(self.source.parts)
        self.rows = Rows(len(parts))
        self.fields = Progress(len(parts), "finding cells", "field", self.progress and table is None)
        if table is not None:
            self._found(0, table)
        else:
            for i, part in enumerate(parts):  # all queued at once: embedding tasks go first (priority 1)
                fut = self.client.submit(self.source.cells_of, part, pure=False, priority=0)
                self.futures[fut.key] = (fut, "part", i)
                self.events.add(fut)
        for fut, result in self.events:
            _, what, where = self.futures.pop(fut.key)
            fut.release()
            if what == "part":
                self._found(where, result)
            else:
                self._embedded(where, result)
            self.writer.check()
        self.writer.close()
        self.bar.close()
        return self.store, self.table, self.blocks_run, {**self.phases, "find_cells_seconds": self.found_s}

    def _found(self, i: int, part: pd.DataFrame) -> None:
        had = self.rows.known
        self.rows.add(i, part)
        self.fields.update(1)
        if self.rows.complete:
            self.fields.close()
            self.found_s = time.perf_counter() - self.t0
            self.table = self.source.combine(self.rows.parts)  # an error when no part has a cell
        elif not self.rows.known:
            return
        if self.store is None and not self.making:
            self.making = True
            self.writer(self._make_store)  # the writer makes it: the first blocks are submitted meanwhile
        if self.rows.complete:
            if self.store is not None and self.store.has_table and self.store.n != len(self.table):
                raise OutputError(f"{self.store.path}: holds {self.store.n} cells, the source has {len(self.table)}")
            self.writer(self._finish_table)
        elif self.rows.known > self.capacity:
            self.capacity = self.rows.known
            self.writer(lambda n=self.capacity: self.store.grow(n))
        self._submit()
        if self.first_rows is not None and had == 0:
            self.first_rows(self.rows.rows(0, min(self.rows.known, FIRST_ROWS), self.cols))

    def _make_store(self) -> None:
        t = time.perf_counter()
        self.store = self.make_store()
        self.phases["store_seconds"] = time.perf_counter() - t

    def _finish_table(self) -> None:
        self.store.grow(len(self.table))
        if not self.store.has_table:
            self.store.write_table(self.table)

    def _write_blocks(self, i: int, emb: np.ndarray) -> None:
        self.store.write_blocks(i, emb)
        self.bar.update(len(emb))

    def _submit(self) -> None:
        """Submit the blocks whose rows are all known, up to the window."""
        chunk, known = self.plan.chunk, self.rows.known
        last = -(-known // chunk) if self.rows.complete else known // chunk  # blocks whose rows are all known
        if self.bar is None and (known or self.rows.complete):
            done = [i for i in range(min(len(self.done), last)) if self.done[i]]
            skipped = sum(min(known, (i + 1) * chunk) - i * chunk for i in done)
            self.bar = Progress(known, "embedding", "cell", self.progress, initial=skipped)
            self.counted = last  # done blocks before it are counted in the bar's start
        elif self.bar is not None:
            self.bar.set_total(known)
        while self.in_flight < self.plan.window and self.next_block < last:
            i = self.next_block
            if i < len(self.done) and self.done[i]:
                if i >= self.counted:  # found done only now (a resumed run finding its cells again)
                    self.writer(self.bar.update, min(known, (i + 1) * chunk) - i * chunk)
                self.next_block += 1
                continue
            j = i + 1
            while j < min(last, i + self.plan.group) and not (j < len(self.done) and self.done[j]):
                j += 1
            rows = self.rows.rows(i * chunk, min(j * chunk, known), self.cols)
            fut = self.client.submit(read_and_embed, self.source, rows, self.spec, self.embed, pure=False, priority=1)
            self.futures[fut.key] = (fut, "blocks", (i, j))
            self.events.add(fut)
            self.in_flight += 1
            self.next_block = j

    def _embedded(self, blocks: tuple[int, int], emb: np.ndarray) -> None:
        i, j = blocks
        self.writer(self._write_blocks, i, emb)
        self.in_flight -= 1
        self.blocks_run += j - i
        self._submit()

    def close(self) -> None:
        for fut, _, _ in self.futures.values():  # what is still queued after a failure or an interruption
            fut.cancel()
        self.writer.pool.shutdown(wait=True)
        for bar in (self.fields, self.bar):
            if bar is not None:
                bar.close()
