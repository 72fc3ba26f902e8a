"""The one guard of everything scdino writes: it deletes only what scdino itself wrote, never a user's files.

Every folder scdino creates carries a marker file (:data:`MARKER`, a line of JSON saying which command wrote it);
stores written before the marker existed are recognised by their own scdino metadata. A command that replaces an
output (``--overwrite``) goes through :func:`claim_dir`, which refuses

* a plain file where a folder is expected,
* the command's input, a folder that holds the input, or a path inside the input,
* a folder scdino did not write (it is never deleted, whatever the options).

Exported model files go through :func:`claim_file`, which refuses to replace a file that no scdino sidecar describes, or
the input itself. Both check that the location can be written before the command starts its work
(:func:`check_writable`); a write that fails later (a full disk) is one line too (:func:`write_failure`).
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import shutil
import socket
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterable, Iterator

from scdino.errors import OutputError

log = logging.getLogger(__name__)

#: the marker file in every folder scdino creates
MARKER = ".scdino"
#: how outputs written before the marker existed are known, as the modules that write them declare
#: (:func:`recognise_zarr`, :func:`recognise_config`): a zarr root attribute -> the command that wrote the store
_ZARR_ATTRS: dict[str, str] = {}
#: (keys every config.json of a run folder has, a file beside it, the command that wrote the folder)
_CONFIGS: list[tuple[frozenset[str], str, str]] = []


def recognise_zarr(attr: str, command: str) -> None:
    """Declare that a zarr store whose root has the attribute ``attr`` was written by ``command`` (stores older than
    the marker); called by the module that writes such stores."""
    _ZARR_ATTRS[attr] = command


def recognise_config(keys: Iterable[str], beside: str, command: str) -> None:
    """Declare that a folder with a ``config.json`` holding every one of ``keys`` and a file ``beside`` was written by
    ``command`` (run folders older than the marker); called by the module that writes such folders."""
    _CONFIGS.append((frozenset(keys), beside, command))


def mark(path: str | os.PathLike, command: str) -> None:
    """Record in the folder ``path`` that ``command`` wrote it."""
    import scdino

    Path(path, MARKER).write_text(json.dumps({"written_by": command, "scdino": scdino.__version__}) + "\n")


def written_by(path: str | os.PathLike) -> str | None:
    """The scdino command that wrote the folder ``path`` (its marker, or the metadata of an older scdino output), or
    None when scdino did not write it."""
    p = Path(path)
    if not p.is_dir():
        return None
    if (p / MARKER).is_file():
        try:
            return str(json.loads((p / MARKER).read_text()).get("written_by") or "scdino")
        except (OSError, ValueError, AttributeError):
            return "scdino"
    for meta in ("zarr.json", ".zattrs"):  # zarr v3 / v2 root attributes
        f = p / meta
        if f.is_file():
            try:
                attrs = json.loads(f.read_text())
            except (OSError, ValueError):
                continue
            attrs = attrs.get("attributes", attrs) if meta == "zarr.json" else attrs
            for key, command in _ZARR_ATTRS.items():
                if isinstance(attrs, dict) and key in attrs:
                    return command
    try:
        config = json.loads((p / "config.json").read_text())
    except (OSError, ValueError):
        return None
    for keys, beside, command in _CONFIGS:
        if isinstance(config, dict) and keys <= set(config) and (p / beside).is_file():
            return command
    return None


def is_empty(path: Path) -> bool:
    """An empty folder, or one holding only scdino's marker (a command stopped before it wrote anything)."""
    return all(f.name == MARKER for f in path.iterdir())


def check_not_input(path: str | os.PathLike, inputs: Iterable[str | os.PathLike | None], option: str = "--out") -> None:
    """Refuse an output that is one of the ``inputs``, a folder holding one of them, or a path inside one (an input is
    only read: nothing is ever written into a plate, a store or a model that a command reads)."""
    out = os.path.realpath(path)
    for inp in inputs:
        if inp is None:
            continue
        real = os.path.realpath(inp)
        if out == real:
            raise OutputError(f"{path}: is the input of this command; choose another {option}")
        if real.startswith(out.rstrip(os.sep) + os.sep):
            raise OutputError(f"{path}: holds the input {inp} of this command; choose another {option}")
        if out.startswith(real.rstrip(os.sep) + os.sep) and os.path.exists(real):
            raise OutputError(f"{path}: is inside the input {inp} of this command; choose another {option} outside it")


#: errors of a write: a full disk or quota, a read-only file system, a location without write permission
WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM)


def write_failure(exc: OSError) -> str:
    """The one line for a write that failed with ``exc`` (one of :data:`WRITE_ERRNOS`): where, why and the fix."""
    name = exc.filename2 or exc.filename  # a copy or a move names its destination second
    where = f"{name}: " if name else ""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        what = "no space left on the device" if exc.errno == errno.ENOSPC else "the disk quota is used up"
        return (
            f"{where}{what} while writing the output; free space there or choose another output location, then run "
            "the command again"
        )
    if exc.errno == errno.EROFS:
        return f"{where}the file system is read-only; choose a writable output location"
    return f"{where}permission denied ({exc.strerror or exc}); check its permissions or choose another location"


def check_writable(path: str | os.PathLike, option: str = "--out", fix: str | None = None) -> None:
    """Refuse, before any work, an output ``path`` whose location cannot be written: a file is made and removed in the
    nearest folder that exists (the folder ``path`` itself when it is one), which is what the command will write into
    (a permission test by mode bits would pass for root on a read-only file system and fail on ACLs that allow it).
    ``fix`` replaces the default advice (choose a writable ``option``)."""
    p = Path(os.path.abspath(path))
    folder = p if p.is_dir() else p.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    probe = folder / f".scdino-write-test-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        why = {errno.EROFS: "the file system is read-only", errno.ENOSPC: "no space left on the device"}.get(
            exc.errno or 0, exc.strerror or str(exc)
        )
        raise OutputError(
            f"{path}: {folder} cannot be written ({why}); {fix or f'choose a writable {option}'}"
        ) from exc


def claim_dir(
    path: str | os.PathLike,
    command: str,
    *,
    inputs: Iterable[str | os.PathLike | None] = (),
    overwrite: bool = False,
    option: str = "--out",
) -> Path:
    """Make ``path`` a folder that ``command`` may write into, and return it.

    A missing folder is created and marked. An existing one must not be an input nor hold one; an empty one is taken;
    a non-empty one must have been written by ``command`` itself (never a user's folder, nor another command's output
    such as a training run or a crop store). With ``overwrite`` it is deleted and made anew; without it, it is kept as
    it is (the caller resumes it or writes beside what is there).
    """
    p = Path(path)
    check_replaceable(p, command, inputs=inputs, overwrite=overwrite, option=option)
    check_writable(p, option)
    if overwrite and p.is_dir() and not is_empty(p):
        shutil.rmtree(p)
    made = [d for d in [p, *p.parents] if not d.exists()]
    try:
        p.mkdir(parents=True, exist_ok=True)
        if not (p / MARKER).is_file():
            mark(p, command)
    except BaseException:  # a full disk: the folders made for it are not left behind
        if made:
            _unlink(p / MARKER)
            _remove_empty(made)
        raise
    return p


@contextmanager
def claimed_dir(
    path: str | os.PathLike,
    command: str,
    *,
    inputs: Iterable[str | os.PathLike | None] = (),
    overwrite: bool = False,
    option: str = "--out",
) -> Iterator[Path]:
    """:func:`claim_dir` for a command that fills a folder (a report): when the command fails, however it fails, a
    folder it made (or found empty) is removed again with what it wrote, so that no empty or half-filled report is
    left; a folder holding an earlier output of the command is kept as it is."""
    p = Path(path)
    fresh = not p.exists() or (p.is_dir() and is_empty(p))
    made = [d for d in [p, *p.parents] if not d.exists()]
    p = claim_dir(p, command, inputs=inputs, overwrite=overwrite, option=option)
    try:
        yield p
    except BaseException:
        if fresh:
            try:
                discard(p, command)
            except OSError as exc:
                log.warning("%s: left behind, it could not be removed (%s)", p, exc.strerror or exc)
            _remove_empty(made)
        raise


def check_replaceable(
    p: Path,
    command: str,
    *,
    inputs: Iterable[str | os.PathLike | None] = (),
    overwrite: bool = False,
    option: str = "--out",
) -> None:
    """What :func:`claim_dir` refuses, checked without touching anything (so a command can check its output before
    it starts work, and replace it only when it writes)."""
    check_not_input(p, inputs, option)
    if p.exists() and not p.is_dir():
        raise OutputError(f"{p}: is a file, not a folder; choose another {option} (scdino never deletes files)")
    if not p.is_dir() or is_empty(p):
        return
    owner = written_by(p)
    if owner is None:
        raise OutputError(
            f"{p}: exists and was not written by scdino, so it is never deleted or written into "
            f"(--overwrite does not apply); choose another {option}"
        )
    if owner != command:
        raise OutputError(
            f"{p}: holds the output of {owner}, not of {command}; {command} neither writes into nor replaces it "
            f"(whatever the options): choose another {option}"
        )


def claim_file(
    path: str | os.PathLike,
    *,
    inputs: Iterable[str | os.PathLike | None] = (),
    option: str = "--out",
    ours: Callable[[Path], bool] | None = None,
) -> Path:
    """Check that a file may be written at ``path``: not an input, not a folder, and not an existing file that scdino
    did not write. ``ours`` tells scdino's files; by default a model file with a scdino sidecar beside it."""
    from scdino.models.sidecar import is_scdino_sidecar, sidecar_path

    p = Path(path)
    check_not_input(p, inputs, option)
    if p.is_dir():
        raise OutputError(f"{path}: is a folder; {option} names the file to write")
    if ours is None:  # a model file: its sidecar, written beside it, must not be a user's file either
        side = sidecar_path(p)
        if side.exists() and not is_scdino_sidecar(side):
            raise OutputError(
                f"{side}: exists and is not a scdino sidecar, and exporting {p.name} would replace it; choose another "
                f"{option}"
            )
    if p.exists() and not (ours or (lambda f: is_scdino_sidecar(sidecar_path(f))))(p):
        raise OutputError(
            f"{path}: exists and was not written by scdino, so it is not replaced; choose another {option}"
        )
    check_writable(p, option)
    p.parent.mkdir(parents=True, exist_ok=True)
    return p


def claim_new(
    path: str | os.PathLike,
    command: str,
    *,
    inputs: Iterable[str | os.PathLike | None] = (),
    overwrite: bool = False,
    option: str = "--out",
) -> Path:
    """For an output written whole (a plate, a crop store): a missing path is taken; an existing one must have been
    written by scdino and is replaced only with ``overwrite``. The caller writes into the returned (empty, marked)
    folder and calls :func:`mark` again if its writer clears the folder first."""
    p = Path(path)
    check_not_input(p, inputs, option)
    if p.is_dir() and not is_empty(p) and written_by(p) == command and not overwrite:
        raise OutputError(f"{path}: already exists; pass --overwrite to replace it, or choose another {option}")
    return claim_dir(p, command, inputs=inputs, overwrite=True, option=option)


@contextmanager
def removed_on_failure(*paths: str | os.PathLike) -> Iterator[None]:
    """Remove the files ``paths`` (partial files the body writes) when the body fails, however it fails (a full disk,
    an interruption), so that nothing half-written is left to fill the disk."""
    try:
        yield
    except BaseException:
        for p in paths:
            _unlink(Path(p))
        raise


def _unlink(path: Path) -> None:
    """Remove the file ``path`` after a failure; where that fails too (a read-only location) say what is left, and
    let the first error be the one reported."""
    if not os.path.lexists(path):
        return
    try:
        path.unlink()
    except OSError as exc:
        log.warning("%s: left behind, it could not be removed (%s)", path, exc.strerror or exc)


@contextmanager
def partial_file(out: str | os.PathLike, tmp: str | os.PathLike | None = None) -> Iterator[Path]:
    """A file written whole or not at all: the body writes the returned path (``tmp``, by default ``OUT.partial``
    beside ``out``), which replaces ``out`` when the body ends and is removed when it fails."""
    out = Path(out)
    tmp = Path(tmp) if tmp is not None else out.with_name(out.name + ".partial")
    with naming_writes(out), removed_on_failure(tmp):
        yield tmp
        os.replace(tmp, out)


def discard(path: str | os.PathLike, command: str) -> bool:
    """Delete ``path`` if ``command`` wrote it (a store a failed run made and filled nothing into); anything else is
    left alone. Returns whether it was deleted."""
    p = Path(path)
    if p.is_dir() and written_by(p) == command:
        shutil.rmtree(p)
        return True
    return False


#: what a lock file of scdino says it is
LOCK_FORMAT = "scdino-lock/1"


def lock_path(path: str | os.PathLike) -> Path:
    """The lock file of the output ``path``: beside it, ``cells.zarr`` -> ``cells.zarr.lock`` (inside it, replacing
    the output with ``--overwrite`` would delete the lock)."""
    p = Path(os.path.abspath(path))
    return p.with_name(p.name + ".lock")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _read_lock(fd: int) -> dict | None:
    """The record of a lock file, or None when the file is not a scdino lock (e.g. a user's file of that name)."""
    os.lseek(fd, 0, os.SEEK_SET)
    data = b""
    while chunk := os.read(fd, 65536):
        data += chunk
    try:
        record = json.loads(data)
    except ValueError:
        return None
    return record if isinstance(record, dict) and record.get("format") == LOCK_FORMAT else None


def _holder(record: dict | None) -> str:
    if not record:
        return "another process"
    host = "this host" if record.get("host") == socket.gethostname() else record.get("host")
    return f"{record.get('command')} (pid {record.get('pid')} on {host}, since {record.get('started')})"


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.fstat(fd).st_ino == os.stat(path).st_ino
    except FileNotFoundError:
        return False


def _new_lock(lock: Path, record: dict) -> int | None:
    """Make the lock file whole and locked in one step: the record is written and flock'ed in a file of its own, which
    is then linked to the lock's name (so no other process ever sees it empty or unlocked). The fd, or None if the
    lock file exists."""
    tmp = lock.with_name(f"{lock.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        os.write(fd, json.dumps(record).encode())
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.link(tmp, lock)
    except FileExistsError:
        os.close(fd)
        return None
    except OSError as exc:
        os.close(fd)
        if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP):
            raise
        return _new_lock_unlinked(lock, record)  # a file system without hard links
    except BaseException:
        os.close(fd)
        raise
    finally:
        tmp.unlink(missing_ok=True)
    return fd


def _new_lock_unlinked(lock: Path, record: dict) -> int | None:
    """:func:`_new_lock` where hard links are not supported: created, then locked and written (another process that
    opens it in between finds it empty, not a scdino lock, and refuses; nothing is lost)."""
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return None
    fcntl.flock(fd, fcntl.LOCK_EX)
    os.write(fd, json.dumps(record).encode())
    return fd


def _take(lock: Path, record: dict, out: str, command: str, option: str) -> int | None:
    """The fd of the lock file ``lock``, now held for ``record``; None when it vanished meanwhile (try again)."""
    fd = _new_lock(lock, record)
    if fd is not None:
        return fd
    try:
        fd = os.open(lock, os.O_RDWR)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        held = _read_lock(fd)
        os.close(fd)
        raise OutputError(
            f"{out}: {_holder(held)} is writing it (lock {lock}); wait for it to finish, or choose another {option}"
        ) from None
    if not _same_file(fd, lock):  # its holder removed it between our open and flock
        os.close(fd)
        return None
    old = _read_lock(fd)
    if old is None:
        os.close(fd)
        raise OutputError(
            f"{lock}: exists and is not a scdino lock, so it is never replaced or deleted; {command} keeps its lock "
            f"there while it writes {out}: move that file, or choose another {option}"
        )
    if old.get("host") != socket.gethostname():
        os.close(fd)
        raise OutputError(
            f"{out}: locked by {_holder(old)}, whose process cannot be checked from here; if no run is writing it any "
            f"more, delete {lock}; else wait, or choose another {option}"
        )
    # nobody holds it: its process was killed (its pid no longer runs, or runs something else now)
    pid = old.get("pid")
    why = "no longer runs" if not isinstance(pid, int) or not _pid_alive(pid) else "no longer holds it"
    log.warning("%s: taking over the stale lock of %s, which %s", out, _holder(old), why)
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, json.dumps(record).encode())
    return fd


@contextmanager
def naming_writes(path: str | os.PathLike) -> Iterator[None]:
    """A failed write (a full disk, a read-only location) inside the block names the output ``path`` where the error
    names no file (a ``write()`` on an open file says only "No space left on device")."""
    try:
        yield
    except OSError as exc:
        if exc.errno in WRITE_ERRNOS and not (exc.filename or exc.filename2):
            exc.filename = str(path)
        raise


@contextmanager
def output_lock(path: str | os.PathLike, command: str, option: str = "--out") -> Iterator[Path]:
    """Hold the lock of the output ``path`` while ``command`` writes it: a second command on the same output is refused
    while the first runs (one line naming its pid, host and start); a lock left by a killed process (its flock is gone
    with it) is taken over with a warning. The lock file (:func:`lock_path`) is removed when the block ends, however
    it ends; a file of that name that is not a scdino lock is never touched. Folders made to hold the lock are removed
    again when they stay empty."""
    lock = lock_path(path)
    made = [d for d in [lock.parent, *lock.parent.parents] if not d.exists()]
    record = {
        "format": LOCK_FORMAT,
        "command": command,
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "out": str(os.path.abspath(path)),
    }
    fd = None
    try:
        lock.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(5):
            fd = _take(lock, record, str(path), command, option)
            if fd is not None:
                break
        else:
            raise OutputError(f"{path}: its lock {lock} keeps changing; another process is taking it: try again")
    except OSError as exc:
        _remove_empty(made)
        raise OutputError(
            f"{lock}: cannot make the lock of {path} ({exc.strerror or exc}); choose a writable {option}"
        ) from exc
    except BaseException:
        _remove_empty(made)
        raise
    try:
        with naming_writes(path):
            yield lock
    finally:
        if _same_file(fd, lock):
            lock.unlink(missing_ok=True)
        os.close(fd)
        _remove_empty(made)


def _remove_empty(folders: list[Path]) -> None:
    """Remove the folders (innermost first) that a command made and left empty; a folder with anything in it stays."""
    for d in folders:
        try:
            d.rmdir()
        except OSError:
            return
