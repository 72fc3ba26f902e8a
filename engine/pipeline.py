"""``scdino-engine run``: cell source -> cells found per part -> blocks of raw crops -> embeddings store.

:func:`run` reads as its steps: open the cell source and the model card (both fail early, before any cluster starts),
choose the path (backend, cached export, the verified precision: :mod:`scdino.engine.precision`), decide whether the
output is new, resumed or already complete, then stream (:mod:`scdino.engine.stream`): the cells of each part (a
plate's field) are found as a Dask task, each block is embedded as soon as its cells are known (the backend opened
once per worker) and written into the output store by one writer thread; a rerun skips blocks already written.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import psutil

from scdino.cells.source import CellSource, open_source
from scdino.cells.table import FIELDS
from scdino.engine import feed
from scdino.engine.backends import BackendSpec, resolve
from scdino.engine.backends.base import stand_in
from scdino.engine.cluster import cores, dask_client
from scdino.engine.config import RunConfig, check_block_memory, cpu_batch_size, gpu_batch_size
from scdino.engine.export_cache import choose, describe
from scdino.engine.output import COMMAND, EmbeddingStore, store_status
from scdino.engine.precision import choose_precision
from scdino.engine.stream import embed_block, run_stream, stream_plan
from scdino.engine.tta import transforms as tta_transforms
from scdino.errors import OutputError
from scdino.models import forget_checkpoints
from scdino.models.card import ModelCard
from scdino.outputs import check_not_input, check_replaceable, discard, is_empty, output_lock, written_by

log = logging.getLogger(__name__)

__all__ = ["RunConfig", "RunResult", "run", "backend_spec", "versions"]


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
    import importlib.metadata as md

    import dask
    import zarr

    import scdino

    return {
        "scdino": scdino.__version__,
        "python": sys.version.split()[0],
        "torch": md.version("torch"),  # as installed: a run on ONNX Runtime does not import torch
        "dask": dask.__version__,
        "zarr": zarr.__version__,
        "numpy": np.__version__,
        "platform": platform.platform(),
    }


def backend_spec(cfg: RunConfig, card: ModelCard, n_channels: int) -> BackendSpec:
    """The backend ``cfg`` asks for, resolved for this model and machine."""
    kind, device = resolve(cfg.backend, cfg.device, card)
    threads = cfg.threads or (
        max(1, (os.cpu_count() or 1) // local_workers(cfg, device)) if not cfg.scheduler else None
    )
    return BackendSpec(
        card=card,
        n_channels=n_channels,
        kind=kind,
        device=device,
        # a forward pass never holds more than a block, so the export cache times the batch the run really uses
        batch_size=min(
            cfg.chunk_cells,
            cfg.batch_size or (cpu_batch_size(card.tokens) if device == "cpu" else gpu_batch_size(card.tokens)),
        ),
        threads=threads,
        checkpoint_key=cfg.checkpoint_key,
        adapt=cfg.adapt,
        seed=cfg.seed,
        tta=cfg.tta,
    )


def local_workers(cfg: RunConfig, device: str) -> int:
    """Worker processes of a local cluster: ``--workers``, else one per visible GPU on CUDA and one on the CPU."""
    if cfg.workers:
        return cfg.workers
    if device == "cuda":
        from scdino.engine.cluster import visible_gpus

        return max(1, len(visible_gpus()))
    return 1


def fingerprint(cfg: RunConfig, source: CellSource, spec: BackendSpec) -> str:
    """What an output store must have been made with to be resumed: the cells, the model and how it runs."""
    card = spec.card
    key = {
        "source": source.identity(),
        "model": card.checkpoint_sha256 or card.spec,
        "exported": card.exported_sha256,
        "backend": {k: v for k, v in spec.to_dict().items() if k not in ("batch_size", "threads", "device")},
        "precision": spec.precision,
        "preprocessing": card.preprocessing.to_dict(),
        "chunk": cfg.chunk_cells,
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()


#: the block function the stream runs (a name here, so that tests can watch it)
_embed_block = embed_block


def _existing_output(cfg: RunConfig) -> dict | None:
    """The status of an output that can be resumed or is complete (whether with the same settings is known once the
    model's path is chosen: :func:`_complete`); an error for anything else there. Checked before any work. With
    ``--overwrite`` an output scdino wrote is replaced only when the new run writes (EmbeddingStore.create), and
    nothing else ever is."""
    inputs = [cfg.plate, cfg.model]  # checked against the output by run() before the lock is taken
    status = store_status(cfg.out)
    if status is None:
        return None
    out = Path(cfg.out)
    if cfg.overwrite:
        check_replaceable(out, COMMAND, inputs=inputs, overwrite=True)
        return None
    if not status:  # not a run output: an empty folder is taken, anything else is left alone
        if out.is_dir() and is_empty(out):
            return None
        owner = written_by(out)
        if owner == COMMAND:  # its store was being made when the run stopped (no cell table or metadata yet)
            raise OutputError(
                f"{cfg.out}: holds a run of {COMMAND} that stopped while its store was being made, before any cell "
                "was embedded; pass --overwrite to make it anew, or choose another --out"
            )
        if owner is not None:
            raise OutputError(f"{cfg.out}: holds the output of {owner}, not a run; choose another --out")
        raise OutputError(
            f"{cfg.out}: exists and is not an unfinished scdino run; it was not written by scdino, so it is never "
            "deleted (--overwrite does not apply): choose another --out"
        )
    if status.get("status") == "creating":  # stopped while being created: made anew
        return None
    if status.get("status") not in ("running", "complete"):
        raise OutputError(
            f"{cfg.out}: its run status {status.get('status')!r} is unknown; pass --overwrite or another --out"
        )
    return status


def _complete(cfg: RunConfig, status: dict | None, fp: str) -> bool:
    """Whether the output is already complete with these settings; a complete run with other settings is refused."""
    if status is None or status.get("status") != "complete":
        return False
    if status.get("fingerprint") == fp:
        return True
    raise OutputError(
        f"{cfg.out}: exists and is not an unfinished scdino run (a complete run with other settings); pass "
        "--overwrite to replace it, or another --out"
    )


def _warn_intensity_range(cfg: RunConfig, source: CellSource, rows: pd.DataFrame, card: ModelCard) -> None:
    """A model with a fixed intensity range warns, per channel, when the plate does not fit it (``rows``: the first
    cells found)."""
    prep = card.preprocessing
    if prep.scale_lo is None or not len(rows):
        return
    from scdino.preprocess import intensity_range_warnings

    sample = source.read(rows)
    where = f"{cfg.plate} (first {len(sample)} cells)"
    for w in intensity_range_warnings(sample, prep.scale_lo, prep.scale_hi, source.channel_names, where):
        log.warning(w)


def _cluster_threads(client) -> tuple[int, int]:
    """(workers, threads in all) of ``client``'s cluster."""
    try:
        workers = client.scheduler_info(n_workers=-1).get("workers", {})
    except TypeError:  # distributed before n_workers= (it listed every worker then)
        workers = client.scheduler_info().get("workers", {})
    return max(1, len(workers)), max(1, sum(int(w.get("nthreads", 1)) for w in workers.values()))


def run(cfg: RunConfig) -> RunResult:
    """Embed every cell of a plate into ``cfg.out``; resumes an interrupted run with the same settings. Options out of
    bounds and an output inside the input are refused before anything else; the output is locked while the run
    writes it (a second run on it is refused)."""
    cfg.validate()
    check_not_input(cfg.out, [cfg.plate, cfg.model])
    with output_lock(cfg.out, COMMAND):
        return _run(cfg)


def _run(cfg: RunConfig) -> RunResult:
    t0 = time.perf_counter()
    status = _existing_output(cfg)  # before any work: the export cache's export and timing take tens of seconds
    source = open_source(cfg.plate, cfg.cells)
    check_block_memory(
        cfg.chunk_cells,
        len(source.channels),
        source.crop_size,
        np.dtype(source.dtype).itemsize,
        psutil.virtual_memory().available,
    )
    card = describe(  # a bad checkpoint, a channel or crop size mismatch fails here, before any work is distributed
        cfg.model,
        cfg.export_cache and cfg.backend == "auto",
        channels=source.channel_names,
        available=source.available_channels,
        input_size=cfg.input_size,
        checkpoint_key=cfg.checkpoint_key,
        adapt=cfg.adapt,
        seed=cfg.seed,
        crop_size=source.crop_size,
    )
    if cfg.fast:
        cfg, card = _fast(cfg, card)
    spec = backend_spec(cfg, card, len(source.channels))
    fp32_asked = "fp32" if cfg.precision == "auto" else cfg.precision
    dtype = np.dtype(source.dtype).name
    path = choose(spec, cfg.backend, cfg.export_cache, source.channel_names, source.crop_size, dtype, fp32_asked)
    if cfg.precision == "auto":  # int8 only where verified on this plate's own crops
        path = choose_precision(spec, path, cfg.backend, cfg.export_cache, source, dtype)
    spec = path.spec
    log.info("path: %s on %s (%s)", path.path, spec.device, path.why)
    spec = stand_in(spec)  # benchmarks/pipeline_ceiling.py: the pipeline with a model that takes no time
    in_process = spec.device == "cpu" and local_workers(cfg, "cpu") == 1 and not cfg.scheduler
    if not (spec.entry.reads_checkpoint and in_process):
        forget_checkpoints()  # no model is built from it in this process (an in-process PyTorch worker reuses it)
    phases: dict[str, float] = {"model_seconds": time.perf_counter() - t0}  # card, export cache, path
    fp = fingerprint(cfg, source, spec)
    backend = f"{spec.kind} on {spec.device}"
    if _complete(cfg, status, fp):
        log.info("%s is already complete; nothing to do", cfg.out)
        return RunResult(cfg.out, int(status.get("n_cells", 0)), 0.0, 0, True, {}, card.untrained, backend)
    resumed = status is not None
    gpus = None
    if spec.device == "cuda" and not cfg.scheduler:
        from scdino.engine.cluster import visible_gpus

        gpus = visible_gpus()
    feed.spent(reset=True)
    if not cfg.scheduler and not gpus and local_workers(cfg, spec.device) == 1:
        # the local CPU worker is a thread of this process: its feeders are forked now, before the cluster's threads
        feed.feeders(feeders_per_worker(cfg, 1, 1))
    t = time.perf_counter()
    with dask_client(cfg.scheduler, local_workers(cfg, spec.device), gpus) as client:
        phases["cluster_seconds"] = time.perf_counter() - t
        store, table, blocks_run = _stream(cfg, client, source, spec, path, fp, resumed, phases)
    seconds = time.perf_counter() - t0
    timing = {"seconds": seconds, **phases, "blocks_run": blocks_run, "resumed": resumed}
    # a resumed run may run on another device or batch size (neither changes the cells' embeddings): the metadata
    # says how the run that finished the store ran
    done = {"status": "complete", "backend": spec.to_dict(), "path": path.to_dict(), "versions": versions()}
    store.finish(_plain({**done, "timing": timing}))
    return RunResult(cfg.out, len(table), seconds, blocks_run, resumed, phases, card.untrained, backend)


def _stream(cfg: RunConfig, client, source: CellSource, spec: BackendSpec, path, fp: str, resumed: bool, phases: dict):
    """Find the cells and embed them into the output store (made once the first cells are known, or resumed)."""
    card, created = spec.card, []

    def make_store() -> EmbeddingStore:  # no cell, no store: an output that --overwrite would replace stays whole
        uns = _uns(cfg, spec, source, "running", path.to_dict())
        created.append(True)
        return EmbeddingStore.create(cfg.out, None, card.embed_dim, cfg.chunk_cells, uns, fp)

    t = time.perf_counter()
    try:
        store, table = make_store, None
        if resumed:
            store = EmbeddingStore.resume(cfg.out, fp)
            table = store.table() if store.has_table else None
            log.info("resuming %s: %d blocks done", cfg.out, int(store.done().sum()))
        workers, threads = _cluster_threads(client)
        feeders = feeders_per_worker(cfg, workers, threads)
        own = getattr(client, "scdino_own_cluster", False)
        plan = stream_plan(spec, source, cfg.chunk_cells, workers, threads, feeders, fixed=own)
        log.debug("stream: %s", plan)
        store, table, blocks_run, stream_phases = run_stream(
            client, source, spec, store, table, plan, cfg.progress, _embed_block,
            first_rows=lambda rows: _warn_intensity_range(cfg, source, rows, card),
        )  # fmt: skip
    except Exception:
        # a store this run made and filled nothing into is not left half-written (an interruption keeps it: the
        # rerun starts from what it holds)
        if created and not _any_block_done(cfg.out):
            discard(cfg.out, COMMAND)
        raise
    finally:
        FIELDS.clear()  # an in-process worker's decoded fields and the checkpoint are not kept past the run
        forget_checkpoints()
        # this process's feeders (an in-process worker's); worker processes end theirs when they end
        feed.stop_feeders()
        phases["feeders_cpu_seconds"] = feed.spent(reset=True)
    phases.update(stream_phases, embed_seconds=time.perf_counter() - t)
    phases["process_cpu_seconds"] = time.process_time()  # this process's, from its start
    return store, table, blocks_run


def feeders_per_worker(cfg: RunConfig, workers: int, threads: int) -> int:
    """Feeder processes per worker: ``--feeders``, else one per core of a worker where they can run (a local
    cluster's workers share this machine's cores; a remote worker's threads stand for its cores)."""
    if cfg.feeders is not None:
        return cfg.feeders
    per_worker = cores() // max(1, workers) if not cfg.scheduler else threads // max(1, workers)
    return feed.default_feeders(per_worker)


def _any_block_done(out: str) -> bool:
    """Whether the store at ``out`` holds a finished block (it may be half-made: then it holds none)."""
    try:
        return bool(EmbeddingStore(out).done().any())
    except Exception:  # made only in part: no progress array, or no metadata yet
        return False


def _asked(cfg: RunConfig, card: ModelCard) -> dict:
    """The MODEL the user gave, where the run embeds with its cached export instead (``runs_as``)."""
    return {} if card.spec == cfg.model else {"model": cfg.model, "runs_as": card.spec}


def fast_input_size(card: ModelCard) -> int:
    """Fast mode's input size: half the model's, rounded down to whole patches (at least two patches across)."""
    patch = card.patch_size
    return max(2 * patch, card.input_size // 2 // patch * patch)


def _fast(cfg: RunConfig, card: ModelCard) -> tuple[RunConfig, ModelCard]:
    size = fast_input_size(card)
    log.info("fast mode: int8 at %d px (the model's input is %d px)", size, card.input_size)
    # an exported model keeps its card: the int8 path then says it quantises checkpoints only
    return replace(cfg, fast=False, precision="int8", input_size=size), (
        card.at_input_size(size) if card.format == "checkpoint" else card
    )


def _uns(cfg: RunConfig, spec: BackendSpec, source: CellSource, status: str, path: dict) -> dict:
    card = spec.card
    return _plain(
        {
            "status": status,
            "untrained": card.untrained,
            "model": {**card.to_dict(), "precision": spec.precision, **_asked(cfg, card)},
            "checkpoint_sha256": card.checkpoint_sha256,
            "channels": list(source.channel_names),
            "crop_size": source.crop_size,
            "preprocessing": card.preprocessing.to_dict(),
            "backend": spec.to_dict(),
            "tta": {"mode": spec.tta, "transforms": len(tta_transforms(spec.tta))},
            "path": path,
            "cells": cfg.cells.to_dict(),
            # which cell settings were given and which the plate carried (scdino.cells.stored); the rest: defaults
            "cells_from": dict(cfg.cells_from),
            "plate": os.path.abspath(cfg.plate),
            "source": source.describe(),
            "versions": versions(),
        }
    )


def _plain(obj: Any) -> Any:
    """JSON-able plain types (AnnData writes those into ``uns``)."""
    return json.loads(json.dumps(obj, default=str))
