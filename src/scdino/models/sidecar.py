"""``model.json``: what an exported model expects and how it was verified."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from scdino.errors import CheckpointError

FORMAT = "scdino-model/1"
#: the sidecar key holding the sha256 of the file it describes, per format: a sidecar proves which graph or plan it is
HASH_KEY = {"onnx": "graph_sha256", "plan": "plan_sha256"}

log = logging.getLogger(__name__)


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


def with_file_hash(meta: dict[str, Any], fmt: str, sha256: str) -> dict[str, Any]:
    """``meta`` recording ``sha256`` as the hash of its own ``fmt`` file; a hash it carried from the file it was made
    from (an int8 copy's fp32 graph, a plan's ONNX) is kept as ``source_<key>``."""
    out = {k: v for k, v in meta.items() if k not in HASH_KEY.values()}
    for key in HASH_KEY.values():
        if meta.get(key):
            out[f"source_{key}"] = meta[key]
    out[HASH_KEY[fmt]] = sha256
    return out


def _dims(value_info: Any) -> list[int | None]:
    """The declared dimensions of an ONNX input or output (None where named or unknown)."""
    return [d.dim_value if d.HasField("dim_value") else None for d in value_info.type.tensor_type.shape.dim]


def _graph_shapes(proto: Any) -> dict[str, int]:
    """What an ONNX graph declares of itself: input channels and the embedding's width (fixed dims only)."""
    got: dict[str, int] = {}
    ins = [i for i in proto.graph.input if i.name not in {t.name for t in proto.graph.initializer}]
    if ins:
        dims = _dims(ins[0])
        if len(dims) == 4 and dims[1]:
            got["in_chans"] = dims[1]
    outs = {o.name: o for o in proto.graph.output}
    cls = outs.get("cls") or (proto.graph.output[0] if proto.graph.output else None)
    if cls is not None:
        dims = _dims(cls)
        if len(dims) == 2 and dims[1]:
            got["embed_dim"] = dims[1]
    return got


def check_identity(path: str | os.PathLike, meta: dict[str, Any], fmt: str, sha256: str, proto: Any = None) -> None:
    """Refuse an exported file that is not the one its sidecar describes: a different sha256 than the sidecar records,
    or (``proto``, a parsed ONNX model) other input channels or output width than the sidecar says. A sidecar written
    before hashes were recorded gets a warning, and the graph's own shapes are still checked."""
    key = HASH_KEY[fmt]
    what = {"in_chans": "input channels", "embed_dim": "output width"}
    diffs = []
    if meta.get(key) and meta[key] != sha256:
        diffs.append(f"sha256 {sha256[:16]}... (sidecar: {str(meta[key])[:16]}...)")
    if proto is not None:
        got = _graph_shapes(proto)
        diffs += [f"{what[k]} {got[k]} (sidecar: {meta[k]})" for k in got if k in meta and int(meta[k]) != got[k]]
    if diffs:
        raise CheckpointError(
            f"{path}: not the model its sidecar {sidecar_path(path).name} describes ({meta.get('model') or 'unknown'}"
            f", {meta.get('arch')}): {'; '.join(diffs)}. The file was replaced or the sidecar belongs to another "
            "model: put the two files of one export side by side, or export the model again"
        )
    if not meta.get(key):
        log.warning(
            "%s: its sidecar %s records no %s (written by an older scdino); only the %s's declared shapes were "
            "checked against it. Export the model again to record its identity",
            path,
            sidecar_path(path).name,
            key,
            "graph" if fmt == "onnx" else "plan",
        )
