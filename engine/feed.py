"""Feeder processes: finding cells, decoding fields and cutting crops outside the process that runs the model.

One Python process shares one interpreter lock among its threads, so a worker that finds cells, decodes fields, cuts
crops and launches the model in threads does all of it on about one core's worth of Python. Here that work runs in
**feeder processes** forked from the worker (:class:`Feeders`), and the crops come back through shared memory:

* A feeder runs one job at a time on its own socket pair: a function and its arguments in, a result out. Arrays of
  the result (the crops of a field) travel as memory file descriptors (``memfd``, passed with ``SCM_RIGHTS``): the
  feeder cuts the crops straight into memory it then hands over (:func:`shared_empty`), and its parent maps the same
  pages, so no array is copied or pickled on the way. Nothing is named in the file system, so nothing is left behind
  when a process is killed: the memory goes when the last process holding it ends.
* A feeder ends when its parent closes its end of the socket, or dies (the feeder then reads end-of-file); it ignores
  Ctrl-C, which its parent handles.
* Where ``fork`` or ``memfd`` is missing (macOS, Windows), or with ``--feeders 0``, the same jobs run in the worker's
  own threads, as before.

The engine's tasks (:func:`find_part`, :func:`gather`, :func:`release`) keep each part's crops in the worker process
that found them (:data:`HELD`) until its blocks are embedded, so a field is decoded once per run.
"""

from __future__ import annotations

import atexit
import io
import logging
import mmap
import os
import pickle
import signal
import socket
import struct
import sys
import threading
import traceback
import warnings
import weakref
import zlib
from collections import deque
from dataclasses import dataclass
from multiprocessing import reduction
from multiprocessing.connection import Connection, Pipe
from typing import Any, Callable, Hashable, Sequence

import numpy as np
import pandas as pd

from scdino.cells.table import FIELDS
from scdino.errors import ScdinoError

log = logging.getLogger(__name__)

#: arrays at least this large travel as shared memory; smaller ones are pickled with the result
SHARE_MIN = 256 << 10
#: at most this many arrays in one result (``SCM_RIGHTS`` passes at most 253 descriptors in one message)
MAX_SHARED = 200


def supported() -> bool:
    """Whether feeder processes can run here: ``fork``, ``memfd_create`` and descriptor passing (Linux)."""
    return sys.platform.startswith("linux") and hasattr(os, "fork") and hasattr(os, "memfd_create")


# ---------------------------------------------------------------------------------------------------------- child side


class _Buffer:
    """Shared memory of a feeder (a memfd, mapped in the feeder and, once sent, in its parent), reused from job to
    job: pages touched once stay mapped on both sides, so a field's crops cost no page faults after the first few."""

    def __init__(self, bid: int, size: int) -> None:
        self.id, self.size = bid, size
        self.fd = os.memfd_create("scdino-crops", os.MFD_CLOEXEC)
        try:
            os.ftruncate(self.fd, size)
            self.mm = mmap.mmap(self.fd, size)
        except BaseException:
            os.close(self.fd)
            raise
        self.busy = False  # holds crops its parent has not let go of
        self.sent = False  # its parent has it mapped

    def close(self) -> None:
        os.close(self.fd)


#: in a feeder process: its buffers by id, the arrays made in them for the job it runs (by data address), and the
#: buffers it closed since its last answer (its parent unmaps them)
_BUFFERS: dict[int, _Buffer] = {}
_MADE: dict[int, _Buffer] | None = None
_CLOSED: list[int] = []
_IDS = iter(range(1, 1 << 62))


def shared_empty(shape: Sequence[int], dtype: Any) -> np.ndarray:
    """An uninitialised array that a feeder process hands to its parent without a copy, in one of its buffers (a free
    one that fits, else a new one; free ones that do not fit are closed then, so a feeder keeps about as many buffers
    as its parent holds); ``np.empty`` outside a feeder, and for arrays too small to be worth it."""
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if _MADE is None or nbytes < SHARE_MIN:
        return np.empty(shape, dtype)
    fits = [b for b in _BUFFERS.values() if not b.busy and nbytes <= b.size <= 2 * nbytes]
    if fits:
        buf = min(fits, key=lambda b: b.size)
    else:
        for b in [b for b in _BUFFERS.values() if not b.busy]:
            _BUFFERS.pop(b.id).close()
            _CLOSED.append(b.id)
        buf = _Buffer(next(_IDS), -(-nbytes // (1 << 20)) << 20)  # whole MiB
        _BUFFERS[buf.id] = buf
    buf.busy = True
    arr = np.frombuffer(buf.mm, dtype, count=int(np.prod(shape, dtype=np.int64))).reshape(shape)
    _MADE[arr.ctypes.data] = buf
    return arr


def _free(ids: Sequence[int]) -> None:
    """In a feeder: its parent let go of these buffers' crops; they may be written again."""
    for i in ids:
        if i in _BUFFERS:
            _BUFFERS[i].busy = False


def _one_off(arr: np.ndarray) -> int:
    """A new memfd holding a copy of ``arr``'s bytes (an array not made by :func:`shared_empty`)."""
    fd = os.memfd_create("scdino-array", os.MFD_CLOEXEC)
    os.ftruncate(fd, arr.nbytes)
    with mmap.mmap(fd, arr.nbytes) as mm:
        np.frombuffer(mm, arr.dtype).reshape(arr.shape)[...] = arr
    return fd


class _Pickler(pickle.Pickler):
    """Pickles a result with its large arrays replaced by references: to a feeder buffer (its memfd added to ``fds``
    the first time its parent gets it), or to a one-off memfd with a copy."""

    def __init__(self, file, fds: list[int]) -> None:
        super().__init__(file, protocol=pickle.HIGHEST_PROTOCOL)
        self.fds = fds
        self.used: set[int] = set()  # the buffers the result refers to

    def persistent_id(self, obj):
        if type(obj) is not np.ndarray or obj.nbytes < SHARE_MIN or obj.dtype.hasobject or len(self.fds) >= MAX_SHARED:
            return None
        buf = _MADE.get(obj.ctypes.data) if _MADE is not None else None
        if buf is not None and obj.flags.c_contiguous:
            self.used.add(buf.id)
            fdi = -1
            if not buf.sent:
                self.fds.append(os.dup(buf.fd))
                fdi, buf.sent = len(self.fds) - 1, True
            return ("buffer", buf.id, buf.size, fdi, obj.shape, obj.dtype.str)
        self.fds.append(_one_off(obj))
        return ("memfd", len(self.fds) - 1, obj.shape, obj.dtype.str)


class _Unpickler(pickle.Unpickler):
    """Loads a result, mapping its arrays: a feeder buffer through the parent's mapping of it (``maps``, made the
    first time), a one-off memfd anew. Once nothing reads a buffer's array any more (it is garbage), its id goes to
    ``let_go``, so that the feeder may write it again."""

    def __init__(self, file, fds: list[int], maps: dict[int, mmap.mmap], let_go: Callable[[int], None]) -> None:
        super().__init__(file)
        self.fds, self.maps, self.let_go = fds, maps, let_go

    def persistent_load(self, pid):
        count = int(np.prod(pid[-2], dtype=np.int64))
        if pid[0] == "buffer":
            _, bid, size, fdi, shape, dtype = pid
            if fdi >= 0:
                self.maps[bid] = mmap.mmap(self.fds[fdi], size)
            root = np.frombuffer(self.maps[bid], np.dtype(dtype), count=count)
            # every view of the result has ``root`` as its base: when it goes, nothing reads the buffer any more
            weakref.finalize(root, self.let_go, bid)
        else:
            _, i, shape, dtype = pid
            root = np.frombuffer(mmap.mmap(self.fds[i], count * np.dtype(dtype).itemsize), np.dtype(dtype), count=count)
        return root.reshape(shape)


def _send(conn: Connection, kind: str, value: Any) -> set[int]:
    """One message: a header (kind, number of descriptors), the pickle of (value, buffers closed since the last
    answer), then the descriptors. The buffers the value refers to."""
    fds: list[int] = []
    buf = io.BytesIO()
    try:
        pickler = _Pickler(buf, fds)
        pickler.dump((value, list(_CLOSED)))
        conn.send_bytes(struct.pack("!8sI", kind.encode(), len(fds)) + buf.getvalue())
        if fds:
            with socket.socket(fileno=os.dup(conn.fileno())) as sock:
                reduction.sendfds(sock, fds)
        _CLOSED.clear()
        return pickler.used
    finally:
        for fd in fds:
            os.close(fd)


def _recv(conn: Connection, maps: dict[int, mmap.mmap], let_go: Callable[[int], None]) -> tuple[str, Any]:
    """(kind, value) of a feeder's answer; the buffers it closed are unmapped here (their arrays keep their pages)."""
    msg = conn.recv_bytes()
    kind, n = struct.unpack("!8sI", msg[:12])
    fds: list[int] = []
    if n:
        with socket.socket(fileno=os.dup(conn.fileno())) as sock:
            fds = list(reduction.recvfds(sock, n))
    try:
        value, closed = _Unpickler(io.BytesIO(msg[12:]), fds, maps, let_go).load()
        for bid in closed:
            maps.pop(bid, None)
        return kind.rstrip(b"\0").decode(), value
    finally:
        for fd in fds:
            os.close(fd)


#: in a feeder process: objects its parent sent once and named (a run's cell source), by name
_KEPT: dict[Hashable, Any] = {}


@dataclass(frozen=True)
class Kept:
    """An argument sent to each feeder once (the first job that needs it) and named ``key`` after that."""

    key: Hashable
    obj: Any = None


def _serve(conn: Connection, share: int) -> None:
    """A feeder's loop: jobs in, results out, until its parent goes. ``share``: the feeders of its parent (the
    decoded-field cache of the process is split between them)."""
    global _MADE
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    FIELDS.clear()  # the parent's decoded fields are not this process's to keep
    FIELDS.total_bytes = max(FIELDS.max_bytes, FIELDS.total_bytes // max(1, share))
    while True:
        try:
            fn, args, free = pickle.loads(conn.recv_bytes())
        except (EOFError, OSError):
            return
        _free(free)
        _MADE = {}
        try:
            args = [_kept(a) for a in args]
            kind, value = "ok", fn(*args)
        except BaseException as exc:  # the job's error goes to the parent, which raises it
            kind, value = "err", _portable(exc)
        used: set[int] = set()
        try:
            try:
                used = _send(conn, kind, value)
            except (pickle.PicklingError, TypeError, AttributeError) as exc:  # a result that does not pickle
                _send(conn, "err", ScdinoError(f"{getattr(fn, '__name__', fn)}: its result does not pickle ({exc})"))
        except (BrokenPipeError, ConnectionResetError, OSError):
            return
        finally:
            for buf in _MADE.values():
                if buf.id not in used:  # made for an array that never reached the parent (an error, a copy)
                    buf.busy = False
            _MADE = {}
            del value


def _kept(arg: Any) -> Any:
    if isinstance(arg, Kept):
        if arg.obj is not None:
            _KEPT.clear()  # one object at a time (its parent's record: _Child.kept)
            _KEPT[arg.key] = arg.obj
        return _KEPT[arg.key]
    return arg


def _portable(exc: BaseException) -> BaseException:
    """``exc`` if it pickles (the parent raises the same error), else a ScdinoError with its text and traceback."""
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:
        text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        return ScdinoError(f"{type(exc).__name__}: {exc} (in a feeder process)\n{text}")


# --------------------------------------------------------------------------------------------------------- parent side


class FeederDied(ScdinoError):
    """A feeder process ended while it ran a job (killed, or out of memory)."""


class _Child:
    def __init__(self, pid: int, conn: Connection) -> None:
        self.pid, self.conn = pid, conn
        self.kept: Hashable = None  # the key of the Kept object this feeder holds (one at a time)
        self.maps: dict[int, mmap.mmap] = {}  # its buffers, as this process maps them
        self.free: deque[int] = deque()  # its buffers this process let go of (from any thread), told with the next job


class Feeders:
    """``n`` feeder processes forked from this one. :meth:`call` runs a job on an idle feeder (or on the feeder
    ``affinity`` picks, so that the reads of one field go to the process that keeps it decoded) and blocks the
    calling thread until its result is back; any number of threads may call at once."""

    _open: list["Feeders"] = []  # every pool of this process: a feeder forked later closes the others' sockets

    def __init__(self, n: int) -> None:
        if not supported():
            raise ScdinoError("feeder processes need Linux (fork and memfd); run with --feeders 0")
        self.n = n
        self.children: list[_Child] = []
        self._cv = threading.Condition()
        self._idle: list[bool] = []
        self.closed = False
        self.cpu_seconds = 0.0  # the feeders' CPU time, known once they ended (close)
        for _ in range(n):
            self.children.append(self._fork())
            self._idle.append(True)
        Feeders._open.append(self)

    def _fork(self) -> _Child:
        parent, child = Pipe(duplex=True)
        with warnings.catch_warnings():  # Python 3.12+ warns about fork in a threaded process: the feeder only runs
            warnings.simplefilter("ignore", DeprecationWarning)  # numpy, zarr and its own socket
            pid = os.fork()
        if pid == 0:  # the feeder
            code = 0
            try:
                parent.close()
                for pool in Feeders._open + [self]:  # sockets of the parent's other feeders are not this one's
                    for c in pool.children:
                        c.conn.close()
                _serve(child, self.n)
            except BaseException:
                code = 1
            finally:
                os._exit(code)
        child.close()
        return _Child(pid, parent)

    def call(self, fn: Callable, *args: Any, affinity: int | None = None) -> Any:
        """``fn(*args)`` in a feeder process (``fn`` importable by name; a :class:`Kept` argument is sent once per
        feeder). Its errors are raised here as they were raised there. Arrays of the result that lie in the feeder's
        buffers are handed back to it once they are garbage here (the feeder makes new buffers meanwhile)."""
        k = self._take(affinity)
        child = self.children[k]
        try:
            kept = [a for a in args if isinstance(a, Kept)]
            if len(kept) > 1:
                raise ValueError("a feeder job takes at most one Kept argument")
            job = [Kept(a.key) if isinstance(a, Kept) and a.key == child.kept else a for a in args]
            free = []
            while child.free:
                free.append(child.free.popleft())
            try:
                child.conn.send_bytes(pickle.dumps((fn, job, free), protocol=pickle.HIGHEST_PROTOCOL))
                kind, value = _recv(child.conn, child.maps, child.free.append)
            except (EOFError, OSError) as exc:
                raise self._died(k, fn) from exc
            if kept:
                child.kept = kept[0].key
        finally:
            self._give(k)
        if kind == "err":
            raise value
        return value

    def _take(self, affinity: int | None) -> int:
        with self._cv:
            while True:
                if self.closed:
                    raise ScdinoError("the feeder processes were closed")
                if affinity is not None:
                    k = affinity % self.n
                    if self._idle[k]:
                        break
                elif any(self._idle):
                    k = self._idle.index(True)
                    break
                self._cv.wait()
            self._idle[k] = False
            return k

    def _give(self, k: int) -> None:
        with self._cv:
            self._idle[k] = True
            self._cv.notify_all()

    def _died(self, k: int, fn: Callable) -> FeederDied:
        child = self.children[k]
        try:
            _, status = os.waitpid(child.pid, 0)
            how = (
                f"signal {os.WTERMSIG(status)}"
                if os.WIFSIGNALED(status)
                else f"exit code {os.waitstatus_to_exitcode(status)}"
            )
        except ChildProcessError:
            how = "unknown status"
        self.close()
        return FeederDied(
            f"feeder process {child.pid} ended ({how}) while running {getattr(fn, '__name__', fn)}; signal 9 is "
            "usually the system running out of memory (each feeder holds a decoded field and its crops): run again "
            "(the run resumes) with fewer --feeders, or --feeders 0"
        )

    def close(self) -> None:
        """End the feeders: their sockets close, they read end-of-file and exit; waits for them."""
        with self._cv:
            if self.closed:
                return
            self.closed = True
            self._cv.notify_all()
        for c in self.children:
            c.conn.close()
        for c in self.children:
            try:
                _, _, usage = os.wait4(c.pid, 0)
                self.cpu_seconds += usage.ru_utime + usage.ru_stime
            except ChildProcessError:
                pass
        if self in Feeders._open:
            Feeders._open.remove(self)


_POOL: Feeders | None = None
_POOL_LOCK = threading.Lock()


def feeders(n: int) -> Feeders | None:
    """This process's feeders (``n`` of them, started on first use; None for ``n == 0`` or where they cannot run)."""
    global _POOL
    if n <= 0 or not supported():
        return None
    with _POOL_LOCK:
        if _POOL is None or _POOL.closed or _POOL.n != n:
            if _POOL is not None:
                _POOL.close()
            _POOL = Feeders(n)
            log.debug("started %d feeder processes in process %d", n, os.getpid())
        return _POOL


#: CPU seconds of this process's feeders that ended (see :func:`spent`)
_SPENT = 0.0


def stop_feeders() -> None:
    """End this process's feeders (once a run found every cell, or at its end; also at exit)."""
    global _POOL, _SPENT
    with _POOL_LOCK:
        if _POOL is not None:
            _POOL.close()
            _SPENT += _POOL.cpu_seconds
            _POOL = None


def spent(reset: bool = False) -> float:
    """The CPU seconds this process's feeders spent, those that ended since the last reset."""
    global _SPENT
    with _POOL_LOCK:
        value = _SPENT
        if reset:
            _SPENT = 0.0
        return value


atexit.register(stop_feeders)


def default_feeders(cores: int) -> int:
    """Feeders of a worker with ``cores`` cores: one per core (a feeder is idle while its crops wait for the model)."""
    return max(1, cores) if supported() else 0


# ------------------------------------------------------------------------------------------- the engine's Dask tasks


class _Held:
    """A part's crops in this process while its blocks are embedded: freed once every row was taken once."""

    def __init__(self, crops: np.ndarray) -> None:
        self.crops = crops
        self.left = len(crops)

    def free(self) -> None:
        self.crops = None  # a feeder's buffer goes back to it once the last view of it is gone


#: (run key, part index) -> that part's crops, in the process that found it
HELD: dict[tuple[str, int], _Held] = {}
_HELD_LOCK = threading.Lock()


def _cells_and_crops(source, part) -> tuple[pd.DataFrame, np.ndarray]:
    return source.cells_and_crops(part, shared_empty)


def _cells_of(source, part) -> pd.DataFrame:
    return source.cells_of(part)


def _read(source, rows: pd.DataFrame) -> np.ndarray:
    return source.read(rows)


def worker_address() -> str | None:
    """The address of the Dask worker running this task (None outside one)."""
    try:
        from distributed import get_worker

        return get_worker().address
    except (ImportError, ValueError):
        return None


def find_part(source, part: Any, key: str, i: int, n_feeders: int) -> tuple[pd.DataFrame, str | None]:
    """Dask task: the cell table of part ``i`` of ``source`` and the address of the worker that holds its crops (``""``
    outside a Dask worker; None where none holds them: no cell, or a source that does not cut as it finds).
    Sources that cut crops as they find cells (``cells_and_crops``) do both from one decode, in a feeder process
    where there are feeders; the crops stay in this process (:data:`HELD`) until :func:`gather` takes them."""
    pool = feeders(n_feeders)
    if not hasattr(source, "cells_and_crops"):
        table = pool.call(_cells_of, Kept(key, source), part) if pool is not None else source.cells_of(part)
        return table, None
    if pool is not None:
        table, crops = pool.call(_cells_and_crops, Kept(key, source), part)
    else:
        table, crops = source.cells_and_crops(part)
    if not len(table):
        return table, None
    with _HELD_LOCK:
        HELD[(key, i)] = _Held(crops)
    return table, worker_address() or ""


@dataclass(frozen=True)
class Piece:
    """Rows ``a:b`` of part ``part``, which are rows ``lo:hi`` of a block's rows."""

    part: int
    a: int
    b: int
    lo: int
    hi: int


def _take(key: str, piece: Piece) -> np.ndarray | None:
    with _HELD_LOCK:
        held = HELD.get((key, piece.part))
        return None if held is None else held.crops[piece.a : piece.b]


def gather(
    source, rows: pd.DataFrame | None, key: str, pieces: Sequence[Piece], n_feeders: int, unit: Sequence[str] = ()
) -> np.ndarray:
    """The raw crops of the ``pieces`` (of one or more parts): the crops held by this process where it found them,
    else read from ``rows`` (in a feeder; the reads of one field on one feeder: ``unit`` names the columns of that
    field). ``rows`` None: every piece is held here (the stream says so); an error names the part that is not."""
    got = [_take(key, p) for p in pieces]
    if len(got) == 1 and got[0] is not None:
        return got[0]  # a view: no copy
    missing = [p.part for p, crops in zip(pieces, got) if crops is None]
    if missing and rows is None:
        raise ScdinoError(
            f"the crops of part {missing[0]} are not held by this worker (it was restarted, or the task moved); run "
            "the command again: it resumes"
        )
    out = None
    n = pieces[-1].hi if pieces else 0
    for p, crops in zip(pieces, got):
        if crops is None:
            crops = _read_rows(source, rows.iloc[p.lo : p.hi], key, n_feeders, unit)
        if out is None:
            out = np.empty((n, *crops.shape[1:]), crops.dtype)
        out[p.lo : p.hi] = crops
    if out is None:
        return _read_rows(source, rows, key, n_feeders, unit)
    return out


def _read_rows(source, rows: pd.DataFrame, key: str, n_feeders: int, unit: Sequence[str]) -> np.ndarray:
    pool = feeders(n_feeders)
    if pool is None or not len(rows):
        return source.read(rows)
    first = tuple(str(rows[c].iloc[0]) for c in unit if c in rows)
    return pool.call(_read, Kept(key, source), rows, affinity=_stable_hash(first))


def _stable_hash(values: tuple) -> int:
    return zlib.crc32("\0".join(values).encode())


def release(key: str, pieces: Sequence[Piece]) -> None:
    """The rows of ``pieces`` were embedded (or found done): a part whose every row was taken is freed."""
    with _HELD_LOCK:
        for p in pieces:
            held = HELD.get((key, p.part))
            if held is None:
                continue
            held.left -= p.b - p.a
            if held.left <= 0:
                HELD.pop((key, p.part)).free()


def forget(key: str) -> int:
    """Free whatever this process still holds of run ``key`` (its end, or a failure); the parts freed."""
    with _HELD_LOCK:
        gone = [k for k in HELD if k[0] == key]
        for k in gone:
            HELD.pop(k).free()
    return len(gone)
