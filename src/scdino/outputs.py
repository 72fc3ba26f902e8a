"""The one guard of everything scdino writes: it deletes only what scdino itself wrote, never a user's files.

Every folder scdino creates carries a marker file (:data:`MARKER`, a line of JSON saying which command wrote it);
stores written before the marker existed are recognised by their own scdino metadata. A command that replaces an
output (``--overwrite``) goes through :func:`claim_dir`, which refuses

* a plain file where a folder is expected,
* the command's input, a folder that holds the input, or a path inside the input,
* a folder scdino did not write (it is never deleted, whatever the options).

Exported model files go through :func:`claim_file`, which refuses to replace a file that no scdino sidecar describes, or
the input itself.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Callable, Iterable

from scdino.errors import OutputError

#: the marker file in every folder scdino creates
MARKER = ".scdino"
#: root attributes of zarr stores that scdino wrote before the marker existed, and the command that wrote them
_ZARR_ATTRS = {"scdino": "scdino-engine run", "scdino_crops": "scdino-engine ingest"}
#: keys every scdino-train config.json has (a run folder written before the marker existed)
_TRAIN_KEYS = {"global_size", "local_crops", "out_dim", "teacher_temp", "intensity_scaling"}


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
    if isinstance(config, dict) and _TRAIN_KEYS <= set(config) and (p / "checkpoint.pth").is_file():
        return "scdino-train"
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
    if overwrite and p.is_dir() and not is_empty(p):
        shutil.rmtree(p)
    p.mkdir(parents=True, exist_ok=True)
    if not (p / MARKER).is_file():
        mark(p, command)
    return p


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


def discard(path: str | os.PathLike, command: str) -> bool:
    """Delete ``path`` if ``command`` wrote it (a store a failed run made and filled nothing into); anything else is
    left alone. Returns whether it was deleted."""
    p = Path(path)
    if p.is_dir() and written_by(p) == command:
        shutil.rmtree(p)
        return True
    return False

