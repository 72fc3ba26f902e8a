"""Scale: time and peak memory of ``scdino-engine run`` from 10,000 to 100,000 cells, and 1 vs 2 Dask workers.

The plate: real nucleus crops (the 48 shipped with scdino, channels CTIP2/BRN2/ROR, their central 32 x 32 px) tiled on
a 32 px grid, 1,024 cells per 1024 x 1024 field, one field per well, with a label image (one disk per tile), so the run
reads stored labels and embeds. The model is small (``random:vit_tiny16`` at 32 px) so that the pipeline, not the
ViT, is what is measured: per-cell time that grows, or memory that grows, is the engine's. Peak memory is the largest
sum of resident memory over the command's whole process tree (the command, the Dask scheduler and workers), sampled
every 0.1 s. The 1,000,000-cell figure is an estimate: the measured 100,000-cell time x 10.

Per-block overhead: the model alone (the same backend in one process, the same cells, the run's batch size) against
the run's embedding phase; the difference is everything that is not inference (reading, Dask, writing).

    python benchmarks/scale.py [--sizes 10000,100000] [--out benchmarks/results/scale.json]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from harness import write_results

CELLS_PER_FIELD = 1024
GRID = 32
MODEL = "random:vit_tiny16"
INPUT = 32


def make_plate(path: Path, n_fields: int) -> str:
    from scdino.data import packaged_crops
    from scdino.engine.sample import FieldImage, write_plate

    crops = packaged_crops()[:, :, 8:40, 8:40]  # (48, 3, 32, 32)
    side = GRID * int(np.sqrt(CELLS_PER_FIELD))
    yy, xx = np.mgrid[:GRID, :GRID]
    disk = (yy - GRID / 2 + 0.5) ** 2 + (xx - GRID / 2 + 0.5) ** 2 <= 10**2
    wells = {}
    rng = np.random.default_rng(0)
    for f in range(n_fields):
        img = np.zeros((3, side, side), np.uint16)
        lab = np.zeros((side, side), np.uint32)
        k = 0
        for ty in range(0, side, GRID):
            for tx in range(0, side, GRID):
                img[:, ty : ty + GRID, tx : tx + GRID] = crops[rng.integers(len(crops))]
                k += 1
                lab[ty : ty + GRID, tx : tx + GRID][disk] = k
        wells[f"{chr(ord('A') + f // 24)}/{f % 24 + 1}"] = [FieldImage(img, {"nuclei": lab})]
    return write_plate(path, wells, ["CTIP2", "BRN2", "ROR"], name="scale")


def tree_rss(pid: int) -> int:
    import psutil

    try:
        p = psutil.Process(pid)
        procs = [p, *p.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for q in procs:
        try:
            total += q.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


def run_measured(cmd: list[str]) -> tuple[float, int]:
    t = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peak = 0
    stop = threading.Event()

    def sample():
        nonlocal peak
        while not stop.is_set():
            peak = max(peak, tree_rss(p.pid))
            time.sleep(0.1)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    _, err = p.communicate()
    stop.set()
    th.join()
    if p.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{err[-3000:]}")
    return time.perf_counter() - t, peak


def model_only_seconds(n: int, batch: int, threads: int) -> float:
    """The backend alone on ``n`` crops (the run's model, input size and batch size), in this process."""
    from scdino.data import packaged_crops
    from scdino.engine.backends import open_backend
    from scdino.engine.backends.base import BackendSpec
    from scdino.models.card import describe_model

    card = describe_model(MODEL, n_channels=3, input_size=INPUT)
    b = open_backend(BackendSpec(card=card, n_channels=3, batch_size=batch, threads=threads))
    crops = np.resize(packaged_crops()[:, :, 8:40, 8:40], (4096, 3, 32, 32))
    b.infer(crops[:batch])
    t = time.perf_counter()
    b.infer(crops)
    return (time.perf_counter() - t) * n / len(crops)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="10000,100000")
    ap.add_argument("--threads", type=int, default=None, help="threads per worker (default: cores / workers)")
    ap.add_argument("--no-two-workers", action="store_true", help="skip the 2-worker run of the largest size")
    ap.add_argument("--out", default="benchmarks/results/scale.json")
    args = ap.parse_args()
    import anndata as ad

    sizes = [int(s) for s in args.sizes.split(",")]
    tmp = Path(tempfile.mkdtemp(prefix="scdino-scale-"))
    n_fields = -(-max(sizes) // CELLS_PER_FIELD)
    t = time.perf_counter()
    plate = make_plate(tmp / "scale.zarr", n_fields)
    print(f"plate of {n_fields} fields written in {time.perf_counter() - t:.0f} s")
    from scdino.cells.plate import Plate

    wells = [f.well for f in Plate(plate).fields()]
    rows = []
    runs = [(n, 1) for n in sizes] + ([] if args.no_two_workers else [(max(sizes), 2)])
    cores = os.cpu_count() or 1
    for n, workers in runs:
        k = -(-n // CELLS_PER_FIELD)
        out = tmp / f"out_{n}_{workers}.zarr"
        cmd = [sys.executable, "-m", "scdino.engine", "run", plate, "--out", str(out), "--labels", "nuclei"]
        cmd += ["--crop-size", "32", "--model", MODEL, "--input-size", str(INPUT), "--no-progress"]
        threads = args.threads or max(1, cores // workers)
        cmd += ["--wells", ",".join(wells[:k]), "--workers", str(workers), "--threads", str(threads)]
        seconds, peak = run_measured(cmd)
        a = ad.read_zarr(out)
        timing = a.uns["scdino"]["timing"]
        cells = a.n_obs
        rows.append(
            {
                "cells": cells,
                "workers": workers,
                "threads": threads,
                "seconds": seconds,
                "cells_per_s": cells / seconds,
                "embed_seconds": timing["embed_seconds"],
                "find_cells_seconds": timing.get("find_cells_seconds"),
                "batch": int(a.uns["scdino"]["backend"]["batch_size"]),
                "peak_rss_mb": peak / 2**20,
            }
        )
        print(rows[-1], flush=True)
    for r in rows:
        if r["workers"] == 1:
            m = model_only_seconds(r["cells"], r["batch"], r["threads"])
            r["model_only_seconds"] = m
            r["overhead_fraction_of_embed"] = 1 - m / r["embed_seconds"]
    one = [r for r in rows if r["workers"] == 1]
    lo, hi = one[0], one[-1]
    summary = {
        "time_per_cell_ratio_large_to_small": (hi["seconds"] / hi["cells"]) / (lo["seconds"] / lo["cells"]),
        "peak_memory_ratio_large_to_small": hi["peak_rss_mb"] / lo["peak_rss_mb"],
        "estimated_1m_cells_seconds": hi["seconds"] * 1_000_000 / hi["cells"],
    }
    print(f"\n{MODEL} at {INPUT} px, real nucleus crops tiled, {CELLS_PER_FIELD} cells per field, whole commands\n")
    print("| cells | workers x threads | s | cells/s | embed s | model alone s | overhead | peak memory (MB, tree) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        ov = f"{100 * r['overhead_fraction_of_embed']:.0f}%" if "overhead_fraction_of_embed" in r else ""
        mo = f"{r['model_only_seconds']:.1f}" if "model_only_seconds" in r else ""
        print(
            f"| {r['cells']:,} | {r['workers']} x {r['threads']} | {r['seconds']:.1f} | {r['cells_per_s']:.0f} | "
            f"{r['embed_seconds']:.1f} | {mo} | {ov} | {r['peak_rss_mb']:.0f} |"
        )
    print(
        f"\ntime per cell, {hi['cells']:,} vs {lo['cells']:,}: {summary['time_per_cell_ratio_large_to_small']:.2f}x; "
        f"peak memory: {summary['peak_memory_ratio_large_to_small']:.2f}x; 1,000,000 cells estimated at "
        f"{summary['estimated_1m_cells_seconds'] / 60:.0f} min"
    )
    res = {
        "benchmark": "scale",
        "model": MODEL,
        "input_size": INPUT,
        "rows": rows,
        "summary": summary,
    }
    write_results(args.out, res)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
