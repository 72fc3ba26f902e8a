"""``scdino-engine run``: plate -> cell table -> raw crops (dask, chunked along cells) -> embeddings store.

Phase 1 finds the cells of every field (one Dask task per field). Phase 2 streams raw crops as a dask array
chunked along cells, maps the backend over its blocks (the backend opened once per worker) and writes each
finished block into the output store; a rerun skips blocks already written.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np
import pandas as pd

from scdino.engine.backends import BackendSpec, get_backend, resolve
from scdino.engine.cells import CellOptions, FieldPlan, empty_table, field_cells, plan_field, read_crops
from scdino.engine.output import EmbeddingStore, store_status
from scdino.errors import ConfigError, InputError, OutputError
from scdino.plate import Plate, resolve_channels

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunConfig:
    """Options of ``scdino-engine run`` (see its ``--help``)."""

    plate: str
    out: str
    model: str = "default"
    cells: CellOptions = field(default_factory=CellOptions)
    checkpoint_key: str = "teacher"
    adapt: str = "mean"
    input_size: int | None = None
    backend: str = "auto"
    device: str = "auto"
    batch_size: int = 64
    workers: int = 1
    threads: int | None = None
    scheduler: str | None = None
    chunk_cells: int = 256
    overwrite: bool = False
    progress: bool = True
    seed: int = 0

    def validate(self) -> None:
        if self.batch_size < 1 or self.chunk_cells < 1 or self.workers < 1 or (self.input_size or 1) < 1:
            raise ConfigError("--batch-size, --chunk-cells, --workers and --input-size must be positive")
        if self.cells.crop_size is not None and self.cells.crop_um is not None:
            raise ConfigError("pass either --crop-size (pixels) or --crop-um (micrometres), not both")


@dataclass
class RunResult:
    out: str
    n_cells: int
    seconds: float
    blocks_run: int
    resumed: bool
    phase_seconds: dict[str, float] = field(default_factory=dict)
    untrained: bool = False
    backend: str = ""


def versions() -> dict[str, str]:
    import dask
    import torch
    import zarr

    import scdino

    return {
        "scdino": scdino.__version__,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "dask": dask.__version__,
        "zarr": zarr.__version__,
        "numpy": np.__version__,
        "platform": platform.platform(),
    }


@contextmanager
def dask_client(scheduler: str | None, workers: int, threads: int | None) -> Iterator[Any]:
    """An existing client, a cluster at ``scheduler``, or a local cluster of ``workers`` processes."""
    from distributed import Client, LocalCluster, get_client

    if scheduler:
        try:
            client = Client(scheduler, timeout="20s")
        except OSError as exc:
            raise ConfigError(f"cannot reach the Dask scheduler at {scheduler} ({exc}); is it running?") from exc
        try:
            yield client
        finally:
            client.close()
        return
    try:
        yield get_client()  # reuse the caller's client
        return
    except ValueError:
        pass
    cluster = LocalCluster(
        n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None, silence_logs=logging.WARNING
    )
    client = Client(cluster)
    try:
        yield client
    finally:
        client.close()
        cluster.close()


def _fingerprint(
    cfg: RunConfig, spec: BackendSpec, model_info: dict, plan: FieldPlan, n_fields: int, source_id: dict
) -> str:
    key = {
        "plate": os.path.abspath(cfg.plate),
        "n_fields": n_fields,
        "cells": cfg.cells.to_dict(),
        "channels": plan.channel_names,
        "crop": plan.crop,
        "model": model_info.get("checkpoint_sha256") or cfg.model,
        "spec": {k: v for k, v in spec.to_dict().items() if k not in ("batch_size", "threads", "device")},
        "exported": model_info.get("exported_sha256"),
        "precision": model_info.get("precision"),
        "source": source_id,
        "chunk": cfg.chunk_cells,
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()


def _embed_block(crops: np.ndarray, spec: BackendSpec) -> np.ndarray:
    """Dask block function: raw crops -> embeddings, with the backend of this worker."""
    return get_backend(spec).infer(crops)


def _read_store_rows(store, rows: np.ndarray, channels: tuple[int, ...]) -> np.ndarray:
    return store.read(rows, channels)


def crops_array(source, table: pd.DataFrame, channels: tuple[int, ...], crop: int, dtype: np.dtype, chunk: int):
    """Raw crops of ``table`` as a dask array (n, C, crop, crop) chunked along cells by ``chunk``.

    ``source`` is a :class:`~scdino.plate.Plate` (windows read around each nucleus, one region read per field) or a
    :class:`~scdino.engine.ingest.CropStore` (rows read from its crop array).
    """
    import dask
    import dask.array as da

    from scdino.engine.ingest import CropStore

    blocks = []
    for a in range(0, len(table), chunk):
        if isinstance(source, CropStore):
            rows = table["store_index"].to_numpy()[a : a + chunk]
            d = dask.delayed(_read_store_rows, pure=True)(source, rows, channels)
        else:
            rows = table.iloc[a : a + chunk][["well", "field", "crop_y0", "crop_x0"]].reset_index(drop=True)
            d = dask.delayed(read_crops, pure=True)(source, rows, channels, crop, dtype)
        blocks.append(da.from_delayed(d, shape=(len(rows), len(channels), crop, crop), dtype=dtype))
    if not blocks:
        return da.zeros((0, len(channels), crop, crop), dtype=dtype, chunks=(chunk, -1, -1, -1))
    return da.concatenate(blocks, axis=0)


def embeddings_array(crops, spec: BackendSpec, embed_dim: int):
    """Map the backend over the blocks of ``crops``: (n, embed_dim) float32, same chunks along cells."""
    return crops.map_blocks(
        _embed_block,
        spec,
        dtype=np.float32,
        drop_axis=[2, 3],
        chunks=(crops.chunks[0], (embed_dim,)),
        meta=np.empty((0, 0), np.float32),
    )


def _model_info(spec: BackendSpec) -> dict:
    """What the model is and expects; opening it here makes bad models fail before work is distributed."""
    if spec.kind == "torch":
        from scdino.models import load_model

        lm = load_model(spec.model, spec.n_channels, spec.input_size, spec.checkpoint_key, spec.adapt, spec.seed)
        precision = "fp16-autocast" if spec.device == "cuda" else "fp32"
        return {**lm.info, "preprocessing": lm.prep.to_dict(), "precision": precision}
    from scdino.export.sidecar import read_sidecar

    meta = read_sidecar(spec.model)
    if meta["in_chans"] != spec.n_channels:
        raise ConfigError(
            f"{spec.model}: exported for {meta['in_chans']} channels ({', '.join(meta.get('channels') or [])}), "
            f"the run selects {spec.n_channels}; pass --channels"
        )
    from scdino.models.checkpoint import sha256_of

    return {
        "model": spec.model,
        "untrained": bool(meta.get("untrained")),
        "arch": meta["arch"],
        "embed_dim": meta["embed_dim"],
        "channels": meta.get("channels"),
        "input_size": meta["input_size"],
        "checkpoint_sha256": meta.get("checkpoint_sha256"),
        "exported_sha256": sha256_of(spec.model),
        "precision": meta["precision"],
        "preprocessing": meta["preprocessing"],
        "source": meta.get("model"),
    }


def _tqdm(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(
        total=total,
        desc=desc,
        unit="cell" if "emb" in desc else "field",
        disable=not enabled or None,
        dynamic_ncols=True,
    )


def run(cfg: RunConfig) -> RunResult:
    """Embed every cell of a plate into ``cfg.out``; resumes an interrupted run with the same settings."""
    cfg.validate()
    t0 = time.perf_counter()
    from scdino.engine.ingest import CropStore, is_crop_store

    if is_crop_store(cfg.plate):
        source: Any = CropStore(cfg.plate)
        if cfg.cells.crop_size not in (None, source.crop_size) or cfg.cells.crop_um is not None:
            raise ConfigError(
                f"{cfg.plate}: a crop store holds {source.crop_size} px crops; drop --crop-size/--crop-um"
            )
        chans = resolve_channels(source.channels, cfg.cells.channels, cfg.plate)
        first = FieldPlan(
            None, tuple(chans), tuple(source.channels[c] for c in chans), tuple(chans[:1]), source.crop_size
        )
        dtype = np.dtype(source.meta["dtype"]).newbyteorder("=")
        fields: list = []
        ignored = [
            o
            for o, v in (
                ("--wells", cfg.cells.wells),
                ("--labels", cfg.cells.labels),
                ("--segment-channel", cfg.cells.segment_channel),
            )
            if v
        ]
        if ignored:
            raise ConfigError(f"{cfg.plate}: a crop store holds cut cells; {', '.join(ignored)} do not apply to it")
    else:
        source = plate = Plate(cfg.plate)
        fields = plate.fields(cfg.cells.wells)
        if not fields:
            raise InputError(f"{cfg.plate}: the plate lists no fields in the selected wells")
        plans = [plan_field(plate, f, cfg.cells) for f in fields]
        first = plans[0]
        for p in plans[1:]:
            if p.channel_names != first.channel_names or p.crop != first.crop:
                raise InputError(
                    f"{plate.path}/{p.ref.path}: channels {p.channel_names} and crop {p.crop} px differ from "
                    f"{first.ref.path} ({first.channel_names}, {first.crop} px); pass --channels / --crop-size so "
                    "that every field gives the same input"
                )
        dtypes = {plate.image(p.ref).array.dtype.newbyteorder("=") for p in plans}
        if len(dtypes) > 1:
            raise InputError(
                f"{plate.path}: fields of different pixel types ({', '.join(map(str, dtypes))}); "
                "convert the plate to one dtype"
            )
        dtype = dtypes.pop()  # native byte order: big-endian stores are converted on read
    kind, device = resolve(cfg.backend, cfg.device, cfg.model)
    threads = cfg.threads or (max(1, (os.cpu_count() or 1) // cfg.workers) if not cfg.scheduler else None)
    spec = BackendSpec(
        cfg.model,
        len(first.channels),
        cfg.input_size,
        cfg.checkpoint_key,
        cfg.adapt,
        kind,
        device,
        cfg.batch_size,
        threads,
        cfg.seed,
    )
    info = _model_info(spec)  # fails early (bad checkpoint, channel count) before any work is distributed
    model_channels = info.get("channels")
    if model_channels and list(model_channels) != list(first.channel_names):
        available = source.channels if isinstance(source, CropStore) else source.channel_names(first.ref)
        missing = [c for c in model_channels if c not in available]
        hint = (
            f"pass --channels {','.join(model_channels)}"
            if not missing
            else "this plate lacks them: pass --model with a model for its channels (e.g. dino_vits16, adapted to any "
            "channels, or one trained with scdino-train)"
        )
        name = "the default model" if cfg.model == "default" else cfg.model
        raise ConfigError(
            f"{name}: trained on channels {', '.join(model_channels)}, the run selects "
            f"{', '.join(first.channel_names)}; {hint}"
        )
    source_id = dict(source.meta) if isinstance(source, CropStore) else {"plate_name": source.name}
    fp = _fingerprint(cfg, spec, info, first, len(fields), source_id)

    status = store_status(cfg.out)
    if status is not None and not cfg.overwrite:
        if status.get("status") == "complete" and status.get("fingerprint") == fp:
            log.info("%s is already complete; nothing to do", cfg.out)
            return RunResult(
                cfg.out,
                int(status.get("n_cells", 0)),
                0.0,
                0,
                True,
                {},
                bool(info.get("untrained")),
                f"{spec.kind} on {spec.device}",
            )
        if status.get("status") != "running":
            raise OutputError(
                f"{cfg.out}: exists and is not an unfinished scdino run; pass --overwrite or another --out"
            )
    resumed = status is not None and status.get("status") == "running" and not cfg.overwrite
    phases: dict[str, float] = {}
    with dask_client(cfg.scheduler, cfg.workers, threads) as client:
        from distributed import as_completed

        if resumed:
            store = EmbeddingStore.resume(cfg.out, fp)
            table = store.table()
            log.info("resuming %s: %d of %d blocks done", cfg.out, int(store.done().sum()), store.n_blocks)
        elif isinstance(source, CropStore):
            table = source.table()
            store = EmbeddingStore.create(
                cfg.out, table, info["embed_dim"], cfg.chunk_cells, _uns(cfg, spec, info, first, "running"), fp
            )
        else:
            t1 = time.perf_counter()
            futs = client.map(field_cells, [plate] * len(fields), fields, [cfg.cells] * len(fields), pure=False)
            parts: dict[int, pd.DataFrame] = {}
            index = {f.key: i for i, f in enumerate(futs)}
            with _tqdm(len(fields), "cells", cfg.progress) as bar:
                for fut, df in as_completed(futs, with_results=True):
                    parts[index[fut.key]] = df
                    bar.update(1)
            frames = [parts[i] for i in range(len(fields)) if len(parts[i])]
            table = pd.concat(frames, ignore_index=True) if frames else empty_table()
            phases["cells_s"] = time.perf_counter() - t1
            if table.empty:
                how = f"labels {cfg.cells.labels!r}" if cfg.cells.labels else "the built-in segmentation"
                raise InputError(
                    f"{cfg.plate}: no nuclei found in {len(fields)} fields with {how}; check --segment-channel and "
                    "the segmentation parameters, or pass --labels with a label image of the plate"
                )
            store = EmbeddingStore.create(
                cfg.out, table, info["embed_dim"], cfg.chunk_cells, _uns(cfg, spec, info, first, "running"), fp
            )
        t2 = time.perf_counter()
        crops = crops_array(source, table, first.channels, first.crop, dtype, cfg.chunk_cells)
        prep = info.get("preprocessing") or {}
        if prep.get("scale_lo") is not None and len(table):
            from scdino.preprocess import intensity_range_warnings

            sample = crops[: min(len(table), 256)].compute()
            where = f"{cfg.plate} (first {len(sample)} cells)"
            for w in intensity_range_warnings(sample, prep["scale_lo"], prep["scale_hi"], first.channel_names, where):
                log.warning(w)
        emb = embeddings_array(crops, spec, info["embed_dim"])
        blocks = emb.to_delayed().ravel()
        todo = [i for i, d in enumerate(store.done()) if not d]
        futures = client.compute([blocks[i] for i in todo])
        index = {f.key: i for f, i in zip(futures, todo)}
        with _tqdm(len(table), "embeddings", cfg.progress) as bar:
            bar.update(int(len(table) - sum(np.diff(store.block_range(i))[0] for i in todo)))
            for fut, result in as_completed(futures, with_results=True):
                i = index[fut.key]
                store.write_block(i, result)
                bar.update(len(result))
                fut.release()
        phases["embed_s"] = time.perf_counter() - t2
    seconds = time.perf_counter() - t0
    uns = _uns(cfg, spec, info, first, "complete")
    uns["timing"] = _plain({"seconds": seconds, **phases, "blocks_run": len(todo), "resumed": resumed})
    store.finish(uns)
    return RunResult(
        cfg.out,
        len(table),
        seconds,
        len(todo),
        resumed,
        phases,
        bool(info.get("untrained")),
        f"{spec.kind} on {spec.device}",
    )


def _uns(cfg: RunConfig, spec: BackendSpec, info: dict, plan: FieldPlan, status: str) -> dict:
    return _plain(
        {
            "status": status,
            "untrained": bool(info.get("untrained")),
            "model": {k: v for k, v in info.items() if k != "preprocessing"},
            "checkpoint_sha256": info.get("checkpoint_sha256"),
            "channels": list(plan.channel_names),
            "crop_size": plan.crop,
            "preprocessing": info["preprocessing"],
            "backend": spec.to_dict(),
            "cells": cfg.cells.to_dict(),
            "plate": os.path.abspath(cfg.plate),
            "versions": versions(),
        }
    )


def _plain(obj: Any) -> Any:
    """JSON-able plain types (AnnData writes those into ``uns``)."""
    return json.loads(json.dumps(obj, default=str))
