"""``--precision auto`` (the default): the fastest arithmetic whose result is verified equal, for this run's cells, to
fp32's.

On a CPU with ONNX Runtime, a trained checkpoint runs as the cached export's dynamic int8 copy (2x fp32 on a VNNI
CPU, docs/numbers.md) only when, on :data:`CHECK_CROPS` crops cut from the run's own plate at its start, every crop's
embedding has a cosine of at least :data:`MIN_COSINE` to its fp32 embedding; otherwise the run stays fp32 and says
why. The check and its numbers are recorded in ``uns["scdino"]["path"]["precision_check"]``. ``--precision fp32``
keeps exact fp32 (no check), ``--precision int8`` asks for int8 whatever the check would say.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd

from scdino.cells.source import CellSource
from scdino.engine.backends import BackendSpec, using
from scdino.engine.export_cache import Choice, choose, eligible, int8_blocker
from scdino.errors import ScdinoError

log = logging.getLogger(__name__)

#: crops of the run's plate the check embeds twice (fp32 and int8)
CHECK_CROPS = 32
#: every check crop's cosine to fp32 must be at least this
MIN_COSINE = 0.999
#: parts (a plate's fields) searched at most for the check crops
CHECK_PARTS = 4


def check_rows(source: CellSource, n: int = CHECK_CROPS) -> pd.DataFrame:
    """Up to ``n`` cells spread evenly over the first parts of ``source`` that have cells (the source's read
    columns)."""
    found, frames = 0, []
    for part in list(source.parts)[:CHECK_PARTS]:
        df = source.cells_of(part)
        frames.append(df)
        found += len(df)
        if found >= n:
            break
    table = pd.concat([f for f in frames if len(f)], ignore_index=True) if found else None
    if table is None:
        return pd.DataFrame(columns=list(source.read_columns))
    pick = np.unique(np.linspace(0, len(table) - 1, min(n, len(table))).round().astype(int))
    return table.iloc[pick][list(source.read_columns)].reset_index(drop=True)


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity of two (n, d) arrays (float64)."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    return (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-30)


def _embed(spec: BackendSpec, crops: np.ndarray) -> np.ndarray:
    with using(spec) as backend:
        return backend.infer(crops)


def choose_precision(
    spec: BackendSpec, fp32: Choice, requested_backend: str, enabled: bool, source: CellSource, dtype: str
) -> Choice:
    """The run's path under ``--precision auto``: ``fp32`` (the fp32 path :func:`choose` took) or the cached export's
    int8 copy when the check on the run's own crops passes. ``spec`` is the model's PyTorch spec."""
    blocker = int8_blocker(spec, requested_backend)
    if blocker is None and eligible(spec, requested_backend, enabled) is not None:
        blocker = "uses the export cache, which is off"
    if blocker is not None:
        return _with_check(fp32, {"chosen": "fp32", "why": f"int8 {blocker}"})
    try:
        int8 = choose(spec, requested_backend, enabled, source.channel_names, source.crop_size, dtype, "int8")
    except ScdinoError as exc:  # an export or quantisation that failed: fp32, as without the cache
        return _with_check(fp32, {"chosen": "fp32", "why": f"no int8 copy: {exc}"})
    rows = check_rows(source)
    if not len(rows):
        return _with_check(fp32, {"chosen": "fp32", "why": "no cells to check on"})
    crops = source.read(rows)
    record = _check(int8, fp32, crops)
    if record["min_cosine"] >= MIN_COSINE:
        why = f"every one of {record['crops']} check crops of this plate has cosine >= {MIN_COSINE} to fp32"
        log.info("precision auto: int8 (%s; min %.5f)", why, record["min_cosine"])
        return _with_check(int8, {**record, "chosen": "int8", "why": why})
    why = (
        f"a check crop's cosine to fp32 is {record['min_cosine']:.5f} < {MIN_COSINE}: int8 would change this plate's "
        "results"
    )
    log.warning("precision auto: fp32 (%s)", why)
    return _with_check(fp32, {**record, "chosen": "fp32", "why": why})


def _check(int8: Choice, fp32: Choice, crops: np.ndarray) -> dict:
    """The check's numbers for ``crops``: measured, or read back from the export cache where the same crops were
    checked with the same two models before (the same inputs give the same cosines: a warm rerun costs no inference)."""
    paths = [int8.details.get("export"), fp32.details.get("export") or fp32.spec.card.spec]
    key = hashlib.sha256(
        json.dumps([paths, [_file_id(p) for p in paths], crops.shape, str(crops.dtype)]).encode() + crops.tobytes()
    ).hexdigest()[:24]
    record_file = Path(paths[0]).parent / "checks" / f"{key}.json" if paths[0] else None
    if record_file is not None and record_file.is_file():
        try:
            return {**json.loads(record_file.read_text()), "cached": True}
        except (OSError, ValueError):
            pass  # unreadable: measured again
    cos = cosines(_embed(int8.spec, crops), _embed(fp32.spec, crops))
    record = {"crops": int(len(cos)), "min_cosine": float(cos.min()), "threshold": MIN_COSINE}
    if record_file is not None:
        record_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = record_file.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(record))
        os.replace(tmp, record_file)
    return record


def _file_id(path: str | None) -> list:
    """A model file as it is now (size, modification time), so that a file replaced in place is checked again."""
    try:
        st = os.stat(path)
        return [st.st_size, st.st_mtime_ns]
    except (OSError, TypeError):
        return []


def _with_check(choice: Choice, check: dict) -> Choice:
    return replace(choice, details={**choice.details, "precision_check": {"rule": _RULE, **check}})


_RULE = f"int8 only where every check crop's cosine to fp32 >= {MIN_COSINE} ({CHECK_CROPS} crops of the run's plate)"
