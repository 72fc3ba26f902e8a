"""``model.json``: what an exported model expects and how it was verified."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from scdino.errors import CheckpointError

FORMAT = "scdino-model/1"


def sidecar_path(model_path: str | os.PathLike) -> Path:
    """``model.onnx`` -> ``model.json``; ``model.int8.onnx`` -> ``model.int8.json``; ``model.plan`` ->
    ``model.plan.json`` (so that a plan built from ``model.onnx`` never overwrites its sidecar)."""
    p = Path(model_path)
    return p.with_suffix(".json") if p.suffix.lower() == ".onnx" else p.with_name(p.name + ".json")


def write_sidecar(model_path: str | os.PathLike, meta: dict[str, Any]) -> Path:
    path = sidecar_path(model_path)
    tmp = path.with_suffix(".json.tmp")
    try:
        tmp.write_text(json.dumps({"format": FORMAT, **meta}, indent=2, default=str))
        os.replace(tmp, path)
    except BaseException:  # a full disk: no half-written sidecar is left
        tmp.unlink(missing_ok=True)
        raise
    return path


def is_scdino_sidecar(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a sidecar written by scdino (the guard of exported files asks this)."""
    try:
        return json.loads(Path(path).read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def read_sidecar(model_path: str | os.PathLike) -> dict[str, Any]:
    path = sidecar_path(model_path)
    if not path.is_file():
        raise CheckpointError(
            f"{model_path}: no {path.name} beside it; scdino needs the sidecar written by scdino-export "
            "(channels, input size, preprocessing): export the model again or copy the .json with it"
        )
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc}); export the model again") from exc
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a scdino model sidecar (format {meta.get('format')!r}, expected {FORMAT})")
    return meta
