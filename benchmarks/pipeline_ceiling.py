"""The pipeline's ceiling: ``scdino-engine run`` with a model that takes no time (``SCDINO_NULL_BACKEND=1``: zeros of
the model's width), against the raw decode-and-cut rate of the same plate on the same cores.

The plate: real nucleus crops (the 48 shipped with scdino, CTIP2/BRN2/ROR, their central 32 x 32 px) tiled on a 32 px
grid with a label image (one disk per tile), ``--field`` px square fields (2048: 4,096 cells each), as many fields as
``--cells`` needs, one field per well. Stored labels, so finding cells is reading labels.

- **raw decode-and-cut**: a plain loop, no Dask, no store: decode every field's image and labels with zarr, find each
  label's centre (np.bincount), cut every 32 px crop. With 1 thread and with a thread per core (fields in parallel).
- **null-backend run**: the whole command in a new process (``--threads T``, one worker), cells/s of the whole
  command and of its embedding phase (``uns["scdino"]["timing"]["embed_seconds"]``).

Prints a table, writes JSON.

    python benchmarks/pipeline_ceiling.py [--cells 100000] [--field 2048] [--threads 1,2] [--chunk-cells 256]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from harness import write_results

GRID = 32
CHANNELS = ["CTIP2", "BRN2", "ROR"]


def make_plate(path: Path, n_cells: int, side: int) -> tuple[str, int]:
    from scdino.data import packaged_crops
    from scdino.engine.sample import FieldImage, write_plate

    crops = packaged_crops()[:, :, 8:40, 8:40]
    per_field = (side // GRID) ** 2
    n_fields = max(1, -(-n_cells // per_field))
    yy, xx = np.mgrid[:GRID, :GRID]
    disk = (yy - GRID / 2 + 0.5) ** 2 + (xx - GRID / 2 + 0.5) ** 2 <= 10**2
    rng = np.random.default_rng(0)
    wells = {}
    for f in range(n_fields):
        pick = rng.integers(len(crops), size=(side // GRID, side // GRID))
        img = crops[pick].transpose(2, 0, 3, 1, 4).reshape(3, side, side).astype(np.uint16)
        lab = np.zeros((side, side), np.uint32)
        ids = np.arange(1, per_field + 1, dtype=np.uint32).reshape(side // GRID, side // GRID)
        tile = np.kron(ids, np.ones((GRID, GRID), np.uint32))
        lab[np.tile(disk, (side // GRID, side // GRID))] = tile[np.tile(disk, (side // GRID, side // GRID))]
        wells[f"{chr(ord('A') + f // 24)}/{f % 24 + 1}"] = [FieldImage(img, {"nuclei": lab})]
    write_plate(path, wells, CHANNELS, name="ceiling")
    return str(path), n_fields * per_field


def _field_paths(plate: str) -> list[str]:
    import zarr

    root = zarr.open_group(plate, mode="r")
    out = []
    for w in root.attrs["ome"]["plate"]["wells"]:
        for im in zarr.open_group(os.path.join(plate, w["path"]), mode="r").attrs["ome"]["well"]["images"]:
            out.append(os.path.join(plate, w["path"], im["path"]))
    return out


def _decode_and_cut(field: str, crop: int = 32) -> int:
    """Decode one field's image and labels, find every label's centre, cut every crop (zero padded)."""
    import zarr

    def level0(path):
        ms = zarr.open_group(path, mode="r").attrs["ome"]["multiscales"][0]
        return zarr.open_array(os.path.join(path, ms["datasets"][0]["path"]), mode="r")[...]

    img, lab = level0(field), level0(os.path.join(field, "labels", "nuclei"))
    flat = lab.ravel()
    n = int(flat.max())
    count = np.bincount(flat, minlength=n + 1)[1:]
    ys, xs = np.divmod(np.arange(flat.size), lab.shape[1])
    cy = np.bincount(flat, ys, minlength=n + 1)[1:] / np.maximum(count, 1)
    cx = np.bincount(flat, xs, minlength=n + 1)[1:] / np.maximum(count, 1)
    pad = np.pad(img, ((0, 0), (crop, crop), (crop, crop)))
    out = np.empty((n, img.shape[0], crop, crop), img.dtype)
    for i, (y, x) in enumerate(zip(np.round(cy).astype(int), np.round(cx).astype(int))):
        y0, x0 = y - crop // 2 + crop, x - crop // 2 + crop
        out[i] = pad[:, y0 : y0 + crop, x0 : x0 + crop]
    return n


def raw_rate(plate: str, threads: int) -> tuple[float, int]:
    fields = _field_paths(plate)
    t = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        n = sum(pool.map(_decode_and_cut, fields))
    return time.perf_counter() - t, n


def null_run(plate: str, out: Path, threads: int, chunk: int) -> dict:
    cmd = [
        sys.executable, "-m", "scdino.engine.cli", "run", plate, "--out", str(out), "--labels", "nuclei",
        "--crop-size", "32", "--model", "random:vit_tiny16", "--input-size", "32", "--threads", str(threads),
        "--chunk-cells", str(chunk),
    ]  # fmt: skip
    env = {**os.environ, "SCDINO_NULL_BACKEND": "1", "OMP_NUM_THREADS": str(threads)}
    t = time.perf_counter()
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t
    if p.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{p.stderr[-3000:]}")
    import anndata as ad

    uns = ad.read_zarr(str(out)).uns["scdino"]
    assert uns["backend"]["kind"] == "null", uns["backend"]
    timing = {
        k: float(v) if isinstance(v, (int, float, np.floating, np.integer)) else v for k, v in uns["timing"].items()
    }
    return {"wall_s": wall, "n_cells": int(ad.read_zarr(str(out)).n_obs), "timing": timing}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cells", type=int, default=100_000)
    ap.add_argument("--field", type=int, default=2048)
    ap.add_argument("--threads", default=f"1,{os.cpu_count()}")
    ap.add_argument("--chunk-cells", type=int, default=256)
    ap.add_argument("--out", default="benchmarks/results/pipeline_ceiling.json")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="scdino-ceiling-"))
    t = time.perf_counter()
    plate, n = make_plate(tmp / "plate.zarr", args.cells, args.field)
    print(
        f"plate: {n} cells in {n // (args.field // GRID) ** 2} fields of {args.field} px ({time.perf_counter() - t:.0f} s)"
    )
    rows = []
    for th in sorted({int(x) for x in args.threads.split(",")}):
        raw_s, raw_n = raw_rate(plate, th)
        r = null_run(plate, tmp / f"null{th}.zarr", th, args.chunk_cells)
        assert raw_n == r["n_cells"] == n, (raw_n, r["n_cells"], n)
        embed_s = r["timing"]["embed_seconds"]
        row = {
            "threads": th,
            "raw_decode_cut_cells_per_s": n / raw_s,
            "null_run_cells_per_s": n / r["wall_s"],
            "null_embed_phase_cells_per_s": n / embed_s,
            "null_run_over_raw": (n / r["wall_s"]) / (n / raw_s),
            "embed_phase_over_raw": (n / embed_s) / (n / raw_s),
            "timing": r["timing"],
        }
        rows.append(row)
        print(f"  {th} thread(s): raw {row['raw_decode_cut_cells_per_s']:.0f} c/s, null run "
              f"{row['null_run_cells_per_s']:.0f} c/s (embed phase {row['null_embed_phase_cells_per_s']:.0f})", flush=True)  # fmt: skip
    print(f"\n{n} cells, {args.field} px fields, blocks of {args.chunk_cells}, {os.cpu_count()} cores\n")
    print("| threads | raw decode + cut, cells/s | null-backend run, cells/s | its embedding phase | run / raw |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['threads']} | {r['raw_decode_cut_cells_per_s']:.0f} | {r['null_run_cells_per_s']:.0f} | "
            f"{r['null_embed_phase_cells_per_s']:.0f} | {r['null_run_over_raw']:.2f} |"
        )
    res = {
        "benchmark": "pipeline_ceiling",
        "cells": n,
        "field": args.field,
        "chunk_cells": args.chunk_cells,
        "results": rows,
    }
    write_results(args.out, res)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
