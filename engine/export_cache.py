"""The fast path a run gets without options: on a CPU, a checkpoint runs through ONNX Runtime from an export made once,
verified exactly as ``scdino-export onnx`` verifies it, and cached.

Each cache entry is a folder ``<cache>/onnx/<key>/`` holding ``model.onnx``, its sidecar and ``choice-<machine>.json``.
The key hashes everything the exported graph depends on: the checkpoint's sha256, the checkpoint key, the channels
(count and names), the channel adaptation, the input size, the crop dtype, the precision and the versions of scdino,
torch, onnx and the opset. The first run with a new key exports and verifies (a failed verification leaves no entry and
the run goes on with PyTorch); then PyTorch and ONNX Runtime embed the same real crops side by side on this machine and
the faster one is recorded per machine (CPU model, core count, threads) in the entry, so the measurement is paid once.

The cache lives in ``$SCDINO_CACHE_DIR`` (default ``$XDG_CACHE_HOME/scdino`` or ``~/.cache/scdino``);
``scdino-engine cache`` lists it and ``scdino-engine cache --clear`` removes the entries scdino wrote (nothing else).
``--no-export-cache`` (or ``SCDINO_EXPORT_CACHE=0``) keeps a run on PyTorch.

A warm run needs no torch: :func:`describe` keeps the card of each checkpoint it described (``<cache>/cards/``, keyed
by the checkpoint file's sha256, the run's model settings and the versions) and gives it back on the next run, and the
card of the cached export comes from the entry (its sidecar, and the sha256 the entry verified).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np

from scdino._optional import pip_extra
from scdino.cpu import has_vnni
from scdino.engine.backends.base import BackendSpec
from scdino.errors import ConfigError, ScdinoError
from scdino.export.onnx_export import OPSET, export_onnx
from scdino.export.quantize import quantize
from scdino.export.verify import fit_crops
from scdino.models.card import ModelCard, describe_model, model_format
from scdino.models.checkpoint import RANDOM, checkpoint_file, sha256_of
from scdino.models.sidecar import read_sidecar
from scdino.progress import heartbeat

log = logging.getLogger(__name__)

MARKER = ".scdino-export-cache"
TIMING_REPEATS = 3


def cache_root() -> Path:
    if os.environ.get("SCDINO_CACHE_DIR"):
        return Path(os.environ["SCDINO_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "scdino"


def enabled_by_env() -> bool:
    return os.environ.get("SCDINO_EXPORT_CACHE", "1").strip().lower() not in ("0", "false", "no", "off")


@dataclass(frozen=True)
class Choice:
    """Which path a run takes and why (recorded in ``uns["scdino"]["path"]``)."""

    spec: BackendSpec
    path: str  # "onnxruntime (cached export)" | "torch"
    why: str
    details: dict

    def to_dict(self) -> dict:
        return {"path": self.path, "why": self.why, **self.details}


def _versions() -> dict:
    """What an export depends on besides the model (torch's version read from its installed metadata: a warm run does
    not import torch)."""
    import importlib.metadata as md

    import scdino

    def v(name):
        try:
            return md.version(name)
        except md.PackageNotFoundError:
            return None

    return {"scdino": scdino.__version__, "torch": v("torch"), "onnx": v("onnx"), "opset": OPSET}


def _card_file(model: str, settings: dict) -> Path | None:
    """Where the card of trained checkpoint ``model`` described with ``settings`` is kept; None for other models."""
    if model_format(model) != "checkpoint" or model.startswith(RANDOM):
        return None
    path = checkpoint_file(model)
    if path is None or not path.is_file():
        return None  # describe_model says what is wrong
    key = {"checkpoint_sha256": sha256_of(path), "model": model, **settings, "versions": _versions()}
    return (
        cache_root() / "cards" / (hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24] + ".json")
    )


def describe(model: str, use_cache: bool, **settings) -> ModelCard:
    """:func:`scdino.models.card.describe_model` of ``model`` with ``settings``; where the export cache is in use
    (``use_cache``: on, and ``--backend auto``), a trained checkpoint's card is kept in the cache and the next run with
    the same file and settings gets it back without building the model (nor importing torch)."""
    where = _card_file(model, settings) if use_cache and enabled_by_env() else None
    if where is not None and where.is_file():
        try:
            return ModelCard.from_record(json.loads(where.read_text()))
        except (ValueError, KeyError, TypeError) as exc:  # a damaged or older record: described again
            log.warning("%s: unreadable card record (%s); describing the model again", where, exc)
    card = describe_model(model, **settings)
    if where is not None and not card.untrained:
        where.parent.mkdir(parents=True, exist_ok=True)
        (cache_root() / MARKER).touch()
        tmp = where.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(card.to_record()))
        os.replace(tmp, where)
    return card


def entry_key(spec: BackendSpec, channel_names, dtype: str) -> str:
    card = spec.card
    key = {
        "checkpoint_sha256": card.checkpoint_sha256,
        "checkpoint_key": spec.checkpoint_key,
        "n_channels": spec.n_channels,
        "channels": list(channel_names) if channel_names else None,
        "adapt": spec.adapt,
        "input_size": card.input_size,
        "dtype": dtype,
        "precision": "fp32",
        "versions": _versions(),
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]


def machine_id(threads: int | None) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    raw = f"{cpu}|{os.cpu_count()}|{threads}"
    return hashlib.sha256(raw.encode()).hexdigest()[:12]


def eligible(spec: BackendSpec, requested_backend: str, enabled: bool, precision: str = "fp32") -> str | None:
    """None when the cached ONNX path may be used; else the reason the run stays on PyTorch (an error where
    ``precision`` int8 was asked for: only the cached export gives it)."""
    if precision == "int8":
        why = int8_blocker(spec, requested_backend)
        if why:
            raise ConfigError(f"--precision int8 {why}")
        return None
    if not enabled or not enabled_by_env():
        return "the export cache is off (--no-export-cache or SCDINO_EXPORT_CACHE=0)"
    if requested_backend != "auto":
        return f"--backend {requested_backend} was asked for"
    if spec.entry.exports_to is None:
        return f"the model is already a {spec.card.format} file"
    if spec.device != "cpu":
        return "on a GPU PyTorch runs fp16 autocast (export a TensorRT plan for more)"
    if spec.card.untrained or not spec.card.checkpoint_sha256:
        return "untrained models (random:ARCH) are not exported"
    if not _have_ort():
        return f"ONNX Runtime is not installed ({pip_extra('onnx')} for the faster CPU path)"
    return None


def _have_ort() -> bool:
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def int8_blocker(spec: BackendSpec, requested_backend: str) -> str | None:
    if requested_backend != "auto" or spec.entry.exports_to is None:  # (--backend X refuses a checkpoint earlier)
        return (
            "quantises a checkpoint's cached export for ONNX Runtime; for an exported model use scdino-export quantize"
        )
    if spec.device != "cpu":
        return "is for CPUs (on a GPU build an int8 TensorRT plan: scdino-export tensorrt --int8)"
    if spec.card.untrained or not spec.card.checkpoint_sha256:
        return "needs a trained checkpoint (random:ARCH models are not exported)"
    return None if _have_ort() else f"needs ONNX Runtime: {pip_extra('onnx')}"


def _int8(entry: Path) -> Path:
    """The entry's dynamic int8 copy (``scdino-export quantize``'s: its fastest form that keeps cosine >= 0.999 to
    fp32 on the check crops, else its most accurate one, never below 0.99), made once."""

    # a cache shared by several machines keeps one copy per kind of CPU: 8-bit signed weights only run right on VNNI
    q = entry / ("model.int8-vnni.onnx" if has_vnni() else "model.int8.onnx")
    if q.is_file() and q.with_suffix(".json").is_file():
        return q
    tmp = entry / f".partial-int8-{os.getpid()}.onnx"
    log.info("quantising the cached export to int8 once (%s)", q)
    try:
        quantize(entry / "model.onnx", tmp)
        os.replace(tmp.with_suffix(".json"), q.with_suffix(".json"))
        os.replace(tmp, q)
    finally:
        tmp.unlink(missing_ok=True)
        tmp.with_suffix(".json").unlink(missing_ok=True)
    return q


def _intact(entry: Path) -> str | None:
    """The sha256 of ``entry``'s model.onnx where the entry is complete and the file is the one that was exported and
    verified; else None."""
    files = [entry / n for n in ("model.onnx", "model.json", "entry.json")]
    if not all(f.is_file() for f in files):
        return None
    try:
        want = json.loads(files[2].read_text()).get("onnx_sha256")
    except ValueError:
        return None
    return want if want is not None and sha256_of(str(files[0])) == want else None


def _entry(spec: BackendSpec, channel_names, crop_size: int, dtype: str) -> tuple[Path, str]:
    """The cache entry's folder, exported and verified on first use, and the sha256 of its model.onnx."""
    root = cache_root() / "onnx"
    entry = root / entry_key(spec, channel_names, dtype)
    sha = _intact(entry)
    if sha:
        return entry, sha
    if entry.is_dir() and (entry / "entry.json").is_file():  # damaged (disk full, a copied cache): made again
        log.warning("%s: the cached export is damaged (its sha256 does not match); exporting it again", entry)
        shutil.rmtree(entry)
    root.mkdir(parents=True, exist_ok=True)
    (cache_root() / MARKER).touch()
    tmp = root / f".partial-{entry.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    log.info("exporting %s to ONNX once for this machine's cache (%s)", spec.card.name, entry)
    t = time.perf_counter()
    try:
        export_onnx(
            spec.card,
            tmp / "model.onnx",
            channels=tuple(channel_names) if channel_names else None,
            crop_size=crop_size,
            dtype=dtype,
        )
        sha = sha256_of(str(tmp / "model.onnx"))
        (tmp / "entry.json").write_text(
            json.dumps(
                {
                    "model": spec.card.spec,
                    "made": time.strftime("%Y-%m-%dT%H:%M:%S"),
                    "seconds": time.perf_counter() - t,
                    "onnx_sha256": sha,
                }
            )
        )
        try:
            os.rename(tmp, entry)  # atomic; another run may have finished the same entry first
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return entry, _intact(entry) or sha


def _timing(spec: BackendSpec, crops: np.ndarray) -> float:
    """Median seconds per batch of ``crops`` through ``spec``'s backend (opened for this, closed after)."""
    from scdino.engine.backends import open_backend

    b = open_backend(spec)
    try:
        b.infer(crops[:2])  # warm-up
        times = []
        for _ in range(TIMING_REPEATS):
            t = time.perf_counter()
            b.infer(crops)
            times.append(time.perf_counter() - t)
    finally:
        b.close()
    return float(np.median(times))


def _choice_file(entry: Path, spec: BackendSpec) -> Path:
    return entry / f"choice-{machine_id(spec.threads)}-batch{spec.batch_size}.json"


def timing_crops(n: int, n_channels: int, crop_size: int, dtype: str) -> np.ndarray:
    """One batch of ``n`` real nucleus crops (shipped with scdino, repeated as needed) in the run's channel count, crop
    size and dtype: both paths are timed at the batch size the run will use."""
    from scdino.data import packaged_crops

    crops = packaged_crops()
    return fit_crops(np.resize(crops, (n, *crops.shape[1:])), n_channels, crop_size, dtype)


def _measure(entry: Path, torch_spec: BackendSpec, ort_spec: BackendSpec, crops: Callable[[], np.ndarray]) -> dict:
    f = _choice_file(entry, torch_spec)
    if f.is_file():
        return json.loads(f.read_text())
    batch = crops()
    with _torch_threads_kept(), heartbeat("timing PyTorch and ONNX Runtime once on this machine"):
        ort_s = _timing(ort_spec, batch)
        torch_s = _timing(torch_spec, batch)
    rec = {
        "onnxruntime_seconds_per_batch": ort_s,
        "torch_seconds_per_batch": torch_s,
        "batch": len(batch),
        "threads": torch_spec.threads,
        "chosen": ort_spec.kind if ort_s <= torch_s else torch_spec.kind,
        "measured": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    f.write_text(json.dumps(rec, indent=1))
    return rec


@contextmanager
def _torch_threads_kept():
    """Restore this process's torch thread count after the timing (the torch backend sets it)."""
    import torch

    n = torch.get_num_threads()
    try:
        yield
    finally:
        torch.set_num_threads(n)


def choose(
    spec: BackendSpec,
    requested_backend: str,
    enabled: bool,
    channel_names,
    crop_size: int,
    dtype: str,
    precision: str = "fp32",
) -> Choice:
    """The backend a run uses: ``spec`` (PyTorch) or the cached, verified ONNX export, whichever measured faster;
    with ``precision="int8"`` the cached export's verified int8 copy (``precision`` as :meth:`RunConfig.validate`
    checked it). The run logs the choice (once, with its device)."""
    reason = eligible(spec, requested_backend, enabled, precision)
    if reason is not None:
        return Choice(spec, spec.kind, reason, {})
    target = spec.entry.exports_to  # the backend of the export (ONNX Runtime for PyTorch)
    try:
        entry, onnx_sha = _entry(spec, channel_names, crop_size, dtype)
    except ScdinoError as exc:
        if precision == "int8":
            raise
        log.warning("the ONNX export for the cache failed (%s); running on %s", exc, spec.kind)
        return Choice(spec, spec.kind, f"the ONNX export failed: {exc}", {})
    if precision == "int8":
        q = str(_int8(entry))
        card = describe_model(q, n_channels=spec.n_channels)
        qr = read_sidecar(q).get("quantization") or {}
        why = (
            f"--precision int8: dynamic int8 copy of the cached export ({qr.get('weights', 'int8')} weights), "
            f"verified against fp32 (min cosine {qr.get('min_cosine_to_fp32', float('nan')):.5f} on its check crops)"
        )
        log.debug("path: %s int8 (%s)", target, why)
        return Choice(replace(spec, card=card, kind=target), f"{target} int8 (cached export)", why, {"export": q})
    onnx_path = str(entry / "model.onnx")
    card = describe_model(onnx_path, n_channels=spec.n_channels, verified_sha256=onnx_sha)
    ort_spec = replace(spec, card=card, kind=target)
    rec = _measure(entry, spec, ort_spec, lambda: timing_crops(spec.batch_size, spec.n_channels, crop_size, dtype))
    details = {"export": onnx_path, "timing": rec}
    if rec["chosen"] == spec.kind:
        why = (
            f"PyTorch measured faster here ({rec['torch_seconds_per_batch']:.3f} s vs "
            f"{rec['onnxruntime_seconds_per_batch']:.3f} s per batch of {rec['batch']})"
        )
        log.debug("path: %s (%s)", spec.kind, why)
        return Choice(spec, spec.kind, why, details)
    why = (
        f"ONNX Runtime measured faster here ({rec['onnxruntime_seconds_per_batch']:.3f} s vs "
        f"{rec['torch_seconds_per_batch']:.3f} s per batch of {rec['batch']}); export verified against PyTorch"
    )
    log.debug("path: %s from the cached export (%s)", target, why)
    return Choice(ort_spec, f"{target} (cached export)", why, details)


def entries() -> list[dict]:
    """The cache's entries: folder, model, size in bytes, when it was made (exports left partial by a run that stopped
    are not entries: :func:`partial` lists them)."""
    root = cache_root() / "onnx"
    out = []
    for e in sorted(root.glob("*")) if root.is_dir() else []:
        if not e.is_dir() or e.name.startswith(
            ".partial-"
        ):  # an export that stopped: not an entry (--clear removes it)
            continue
        meta = {}
        if (e / "entry.json").is_file():
            meta = json.loads((e / "entry.json").read_text())
        size = sum(p.stat().st_size for p in e.rglob("*") if p.is_file())
        out.append({"entry": str(e), "model": meta.get("model"), "bytes": size, "made": meta.get("made")})
    return out


def partial() -> list[Path]:
    """Exports left partial by a run that stopped while exporting (removed by :func:`clear`)."""
    root = cache_root() / "onnx"
    return sorted(e for e in root.glob(".partial-*") if e.is_dir()) if root.is_dir() else []


def clear() -> int:
    """Remove the entries scdino wrote (exported entries and partial ones); returns how many."""
    root = cache_root() / "onnx"
    if not (cache_root() / MARKER).is_file() or not root.is_dir():
        return 0
    n = 0
    for e in root.iterdir():
        ours = e.is_dir() and (e.name.startswith(".partial-") or (e / "entry.json").is_file())
        if ours:
            shutil.rmtree(e)
            n += 1
    return n
