"""Where a run's time goes besides inference: start-up, fixed costs and per-block overhead of ``scdino-engine run``.

The run: the neocortex sample plate's well A/1 (235 cells, found by the built-in segmentation), a ViT-S/16 checkpoint
at 224 px in DINO's layout (random weights: time does not depend on their values), defaults (the cached, verified
ONNX export on a CPU), the export cache warm. Each repeat times, side by side:

- the whole command (a new process: interpreter, imports, command line, run, store finished);
- its phases as the run records them in ``uns["scdino"]["timing"]``: model (card, export cache hit, path), cluster
  start, finding cells, making the store, embedding;
- in this process, the same backend alone on the same cells: opening it, and inference at the run's batch size;
- ``python -c "import scdino.engine.pipeline"``: the imports a run needs;
- ``scdino-engine --help`` (``python -m scdino.engine --help``).

Derived: fixed start-up (imports + model + cluster + opening the backend); per-block overhead = the embedding phase
minus (opening + inference), as a share of the embedding phase (reading crops, Dask, writing blocks).

Also: making a store's ``obs`` and ``uns`` with anndata's writer through zarr's local store against
:func:`scdino.engine.output.write_small` (the same files), for the run's 235 cells and for 100,000.

    python benchmarks/overhead.py [--repeats 5] [--threads N] [--arch vit_small16] [--no-store-writes]
                                  [--out benchmarks/results/overhead.json]

``--arch vit_tiny16`` keeps inference short where only the fixed costs are wanted (they do not depend on the
model's size beyond opening it).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
from harness import write_results

from reference import SEG, timed  # the same cells and the same whole-command timing as the reference comparison

PHASES = ("model_seconds", "cluster_seconds", "find_cells_seconds", "store_seconds", "embed_seconds")


def store_writes(obs, uns: dict, tmp: Path, repeats: int) -> dict:
    """Median seconds of writing ``obs`` + ``uns`` with anndata through zarr's local store and with write_small."""
    import anndata as ad

    from scdino.engine.output import write_small

    adata = ad.AnnData(obs=obs, uns={"scdino": uns})
    out: dict[str, list[float]] = {"anndata": [], "write_small": []}
    for _ in range(repeats):
        for name in out:
            target = tmp / f"{name}.zarr"
            shutil.rmtree(target, ignore_errors=True)
            t = time.perf_counter()
            if name == "anndata":
                with ad.settings.override(zarr_write_format=3), warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    adata.write_zarr(target)
            else:
                write_small(str(target), adata)
            out[name].append(time.perf_counter() - t)
    return {k: float(np.median(v)) for k, v in out.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, help="threads of the run and of the backend alone (default: all cores)")
    ap.add_argument("--arch", default="vit_small16", help="architecture of the random-weight checkpoint")
    ap.add_argument("--no-store-writes", action="store_true", help="skip the obs + uns write comparison")
    ap.add_argument("--out", default="benchmarks/results/overhead.json")
    args = ap.parse_args()
    threads = args.threads or os.cpu_count() or 1
    import anndata as ad
    import pandas as pd
    import torch

    from scdino.cells.options import CellOptions, SegmentParams
    from scdino.cells.source import open_source
    from scdino.engine.backends import BackendSpec, open_backend
    from scdino.engine.config import cpu_batch_size
    from scdino.engine.sample import write_sample_plate
    from scdino.models import arch_config, build_model
    from scdino.models.card import describe_model

    tmp = Path(tempfile.mkdtemp(prefix="scdino-overhead-"))
    env = {**os.environ, "SCDINO_CACHE_DIR": str(tmp / "cache")}
    plate = write_sample_plate(tmp / "neocortex.zarr", "neocortex")
    torch.manual_seed(0)
    ckpt = str(tmp / "vit_small16.pth")
    torch.save(build_model(arch_config(args.arch)).state_dict(), ckpt)
    out = tmp / "run.zarr"
    cmd = [sys.executable, "-m", "scdino.engine", "run", plate, *SEG, "--crop-size", "32", "--no-progress"]
    cmd += ["--threads", str(threads), "--wells", "A/1", "--model", ckpt, "--out", str(out), "--overwrite"]
    timed(cmd, env)  # the cold run: export, verification, timing of both paths
    a = ad.read_zarr(out)
    path = a.uns["scdino"]["path"]
    if "export" not in path:
        raise SystemExit(f"the run did not take the cached export ({path.get('why')}); nothing to measure here")
    cells = CellOptions(
        segment_channel="CTIP2,BRN2,ROR", crop_size=32, wells=("A/1",), segment=SegmentParams(1, "otsu", 4, 15)
    )
    source = open_source(plate, cells)
    table = a.obs.reset_index(drop=True)
    crops = source.read(table[list(source.read_columns)])
    card = describe_model(path["export"], channels=source.channel_names)
    spec = BackendSpec(
        card=card, n_channels=3, kind="onnxruntime", batch_size=cpu_batch_size(card.tokens), threads=threads
    )
    imports_cmd = [sys.executable, "-c", "import scdino.engine.pipeline"]
    help_cmd = [sys.executable, "-m", "scdino.engine", "--help"]
    runs = []
    for r in range(args.repeats):
        row = {"command": timed(cmd, env)}
        timing = ad.read_zarr(out).uns["scdino"]["timing"]
        row.update({k: float(timing[k]) for k in (*PHASES, "seconds")})
        t = time.perf_counter()
        backend = open_backend(spec)
        row["backend_open"] = time.perf_counter() - t
        backend.infer(crops[: spec.batch_size])  # ORT's first call plans its memory; a run's first block pays that too
        t = time.perf_counter()
        backend.infer(crops)
        row["inference"] = time.perf_counter() - t
        backend.close()
        row["imports"] = timed(imports_cmd, env)
        row["help"] = timed(help_cmd, env)
        runs.append(row)
        print(f"  repeat {r + 1}: command {row['command']:.1f} s, embedding {row['embed_seconds']:.1f} s, "
              f"inference alone {row['inference']:.1f} s", flush=True)  # fmt: skip
    med = {k: float(np.median([r[k] for r in runs])) for k in runs[0]}
    overhead = [(r["embed_seconds"] - r["backend_open"] - r["inference"]) / r["embed_seconds"] for r in runs]
    fixed = [r["imports"] + r["model_seconds"] + r["cluster_seconds"] + r["backend_open"] for r in runs]
    outside = [r["command"] - r["seconds"] for r in runs]
    summary = {
        "cells": int(len(table)),
        "fixed_startup_seconds": float(np.median(fixed)),
        "per_block_overhead_fraction": float(np.median(overhead)),
        "per_block_overhead_range": [float(min(overhead)), float(max(overhead))],
        "outside_run_seconds": float(np.median(outside)),
        "help_seconds": med["help"],
    }
    big = pd.concat([table] * (-(-100_000 // len(table))), ignore_index=True).iloc[:100_000]
    big["label"] = np.arange(len(big))
    uns = dict(a.uns["scdino"])
    writes = (
        {}
        if args.no_store_writes
        else {"235": store_writes(table, uns, tmp, 5), "100000": store_writes(big, uns, tmp, 3)}
    )

    rows = [
        ("whole command", med["command"]),
        ("  process start, imports, command line, finishing the store", float(np.median(outside))),
        ("    of which the imports a run needs", med["imports"]),
        ("  model: card, export cache hit, path", med["model_seconds"]),
        ("  cluster start", med["cluster_seconds"]),
        ("  finding cells (segmentation)", med["find_cells_seconds"]),
        ("  making the store", med["store_seconds"]),
        ("  embedding", med["embed_seconds"]),
        ("    the backend alone: opening it", med["backend_open"]),
        ("    the backend alone: inference", med["inference"]),
        ("scdino-engine --help (a command of its own)", med["help"]),
    ]
    print(
        f"\n{len(table)} cells of the neocortex sample plate (A/1), {args.arch} at 224 px, {path['path']}, {threads} "
        f"thread(s) on {os.cpu_count()} cores; medians of {args.repeats} repeats\n"
    )
    print("| part | s | share of the command |\n|---|---|---|")
    for name, s in rows:
        print(f"| {name} | {s:.2f} | {100 * s / med['command']:.0f}% |")
    print(
        f"\nfixed start-up (imports + model + cluster + opening the backend): {summary['fixed_startup_seconds']:.2f} s"
        f"\nper-block overhead (embedding minus opening and inference, share of embedding): "
        f"{100 * summary['per_block_overhead_fraction']:.1f}% (repeats: "
        f"{100 * min(overhead):.1f} to {100 * max(overhead):.1f}%)"
    )
    print("\n| making a store's obs + uns | anndata via zarr's local store (s) | write_small (s) | ratio |")
    print("|---|---|---|---|")
    for n, w in writes.items():
        ratio = w["anndata"] / w["write_small"]
        print(f"| {int(n):,} cells | {w['anndata']:.2f} | {w['write_small']:.2f} | {ratio:.1f}x |")
    res = {
        "benchmark": "overhead",
        "model": f"{args.arch} at 224 (random weights)",
        "path": path,
        "threads": threads,
        "repeats": runs,
        "medians": med,
        "summary": summary,
        "store_writes": writes,
        "versions": a.uns["scdino"]["versions"],
    }
    write_results(args.out, res)
    print(f"wrote {args.out}")
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
