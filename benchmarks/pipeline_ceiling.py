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

    python benchmarks/pipeline_ceiling.py [--cells 100000] [--field 2048] [--threads 1,2,ALL] [--chunk-cells 256]

Each side runs pinned to the same first T cores (``os.sched_setaffinity``), one after the other.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from harness import write_results

from scdino.engine.sample import FieldImage, write_plate

GRID = 32
CHANNELS = ["CTIP2", "BRN2", "ROR"]


class _Field(Sequence):
    """One well's one field, made when the plate writer asks for it (a 1M-cell plate never lies in memory)."""

    def __init__(self, make: Callable[[], FieldImage]) -> None:
        self.make = make

    def __len__(self) -> int:
        return 1

    def __getitem__(self, i):
        if i not in (0, -1):
            raise IndexError(i)
        return self.make()


def make_plate(path: Path, n_cells: int, side: int) -> tuple[str, int]:
    from scdino.data import packaged_crops

    crops = packaged_crops()[:, :, 8:40, 8:40]
    per_field = (side // GRID) ** 2
    n_fields = max(1, -(-n_cells // per_field))
    yy, xx = np.mgrid[:GRID, :GRID]
    disk = np.tile((yy - GRID / 2 + 0.5) ** 2 + (xx - GRID / 2 + 0.5) ** 2 <= 10**2, (side // GRID, side // GRID))
    ids = np.arange(1, per_field + 1, dtype=np.uint32).reshape(side // GRID, side // GRID)
    tile = np.kron(ids, np.ones((GRID, GRID), np.uint32))

    def field(f: int) -> FieldImage:
        pick = np.random.default_rng(f).integers(len(crops), size=(side // GRID, side // GRID))
        img = crops[pick].transpose(2, 0, 3, 1, 4).reshape(3, side, side).astype(np.uint16)
        lab = np.zeros((side, side), np.uint32)
        lab[disk] = tile[disk]
        return FieldImage(img, {"nuclei": lab})

    wells = {f"{_row(f // 24)}/{f % 24 + 1}": _Field(lambda f=f: field(f)) for f in range(n_fields)}
    write_plate(path, wells, CHANNELS, name="ceiling")
    return str(path), n_fields * per_field


def _row(i: int) -> str:
    """Plate row names past Z: A..Z, then AA, AB, ... (a 1M-cell plate has more wells than a 384-well plate)."""
    return chr(ord("A") + i) if i < 26 else _row(i // 26 - 1) + chr(ord("A") + i % 26)


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


def _cores(threads: int) -> set[int]:
    """The first ``threads`` cores this process may run on: both sides of a comparison run on the same cores."""
    return set(sorted(os.sched_getaffinity(0))[:threads])


def raw_rate(plate: str, threads: int) -> tuple[float, int]:
    fields = _field_paths(plate)
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, _cores(threads))
    try:
        t = time.perf_counter()
        with ThreadPoolExecutor(threads) as pool:
            n = sum(pool.map(_decode_and_cut, fields))
        return time.perf_counter() - t, n
    finally:
        os.sched_setaffinity(0, before)


def tree_memory(proc) -> tuple[int, int]:
    """(proportional set size, resident set size) summed over ``proc`` and its children, in bytes. PSS counts a page
    shared by n processes as 1/n in each (feeder processes are forked: they share the pages of the worker they came
    from, which RSS would count once per process); RSS where PSS cannot be read."""
    import psutil

    pss = rss = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            info = p.memory_full_info()
            pss += getattr(info, "pss", info.rss)
            rss += info.rss
        except psutil.Error:
            pass
    return pss, rss


def null_run(
    plate: str, out: Path, threads: int, chunk: int, wells: list[str] | None = None, extra: Sequence[str] = ()
) -> dict:
    """The whole command with the null backend on the first ``threads`` cores; its wall time and peak memory (the
    largest proportional set size of the command and its children, sampled every 0.1 s; the largest resident set
    beside it)."""
    import psutil

    cmd = [
        sys.executable, "-m", "scdino.engine.cli", "run", plate, "--out", str(out), "--labels", "nuclei",
        "--crop-size", "32", "--model", "random:vit_tiny16", "--input-size", "32", "--threads", str(threads),
        "--chunk-cells", str(chunk), "--no-progress",
    ]  # fmt: skip
    if wells:
        cmd += ["--wells", ",".join(wells)]
    cmd += list(extra)
    env = {**os.environ, "SCDINO_NULL_BACKEND": "1", "OMP_NUM_THREADS": str(threads)}
    cores = _cores(threads)
    t = time.perf_counter()
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        preexec_fn=lambda: os.sched_setaffinity(0, cores),
    )  # fmt: skip
    peak = peak_rss = 0
    ps = psutil.Process(proc.pid)
    while proc.poll() is None:
        try:
            pss, rss = tree_memory(ps)
            peak, peak_rss = max(peak, pss), max(peak_rss, rss)
        except psutil.Error:
            pass
        time.sleep(0.1)
    wall = time.perf_counter() - t
    _, err = proc.communicate()
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{err[-3000:]}")
    import anndata as ad

    a = ad.read_zarr(str(out))
    uns = a.uns["scdino"]
    assert uns["backend"]["kind"] == "null", uns["backend"]
    timing = {
        k: float(v) if isinstance(v, (int, float, np.floating, np.integer)) else v for k, v in uns["timing"].items()
    }
    return {
        "wall_s": wall,
        "n_cells": int(a.n_obs),
        "timing": timing,
        "peak_pss_mb": peak / 2**20,
        "peak_rss_mb": peak_rss / 2**20,
    }


def _wells(plate: str) -> list[str]:
    import zarr

    return [w["path"] for w in zarr.open_group(plate, mode="r").attrs["ome"]["plate"]["wells"]]


def scale(plate: str, tmp: Path, sizes: list[int], per_field: int, threads: int, chunk: int, repeats: int = 1):
    """Null-backend runs on the first wells of one plate (one field each), the sizes in turn, ``repeats`` rounds;
    medians of wall time and peak memory per size."""
    wells, runs = _wells(plate), {n: [] for n in sizes}
    for _ in range(repeats):
        for n in sizes:
            use = wells[: max(1, n // per_field)]
            r = null_run(plate, tmp / f"scale{n}.zarr", threads, chunk, use)
            runs[n].append(r)
            print(f"  {r['n_cells']} cells: {r['wall_s']:.1f} s, {r['n_cells'] / r['wall_s']:.0f} cells/s, "
                  f"peak {r['peak_pss_mb']:.0f} MB (PSS; RSS summed {r['peak_rss_mb']:.0f})", flush=True)  # fmt: skip
            shutil.rmtree(tmp / f"scale{n}.zarr", ignore_errors=True)
    rows = []
    for n in sizes:
        rs = runs[n]
        med = {k: float(np.median([r[k] for r in rs])) for k in ("wall_s", "peak_pss_mb", "peak_rss_mb")}
        timing = {k: float(np.median([r["timing"][k] for r in rs])) for k in rs[0]["timing"] if k != "resumed"}
        rows.append({"cells": rs[0]["n_cells"], **med, **timing, "runs": rs})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cells", type=int, default=100_000)
    ap.add_argument("--field", type=int, default=2048)
    ap.add_argument("--threads", default=f"1,2,{len(os.sched_getaffinity(0))}", help="cores to run on, each in turn")
    ap.add_argument("--chunk-cells", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=1, help="raw and null runs alternated this many times (medians)")
    ap.add_argument("--sizes", help="instead: null runs of these many cells (e.g. 10000,100000,1000000) on all cores")
    ap.add_argument("--out", default="benchmarks/results/pipeline_ceiling.json")
    ap.add_argument(
        "--plate", help="a plate this script made before (make_plate), kept between runs: it is not made or removed"
    )
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="scdino-ceiling-"))
    sizes = sorted(int(x) for x in args.sizes.split(",")) if args.sizes else None
    t = time.perf_counter()
    per_field = (args.field // GRID) ** 2
    if args.plate:
        plate = args.plate
        n = len(_field_paths(plate)) * per_field
        if not sizes:
            n = min(n, -(-args.cells // per_field) * per_field)
            if n < len(_field_paths(plate)) * per_field:
                raise SystemExit(f"{plate}: holds more than --cells {args.cells}; the ceiling runs a whole plate")
    else:
        plate, n = make_plate(tmp / "plate.zarr", max(sizes) if sizes else args.cells, args.field)
    print(f"plate: {n} cells in {n // per_field} fields of {args.field} px ({time.perf_counter() - t:.0f} s)")
    try:
        if sizes:
            th = len(os.sched_getaffinity(0))
            rows = scale(plate, tmp, sizes, per_field, th, args.chunk_cells, args.repeats)
            res = {"benchmark": "pipeline_scale", "field": args.field, "chunk_cells": args.chunk_cells, "threads": th}
            _scale_table(rows)
            write_results(args.out, {**res, "results": rows})
        else:
            rows = [
                _ceiling_row(plate, tmp, n, th, args.chunk_cells, args.repeats)
                for th in sorted(set(map(int, args.threads.split(","))))
            ]
            print(f"\n{n} cells, {args.field} px fields, blocks of {args.chunk_cells}, {os.cpu_count()} cores\n")
            _ceiling_table(rows)
            res = {"benchmark": "pipeline_ceiling", "cells": n, "field": args.field, "chunk_cells": args.chunk_cells}
            write_results(args.out, {**res, "results": rows})
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"\nwrote {args.out}")


def _ceiling_row(plate: str, tmp: Path, n: int, th: int, chunk: int, repeats: int) -> dict:
    """Raw decode-and-cut, the null run with its default feeders and with ``--feeders 0``, alternated ``repeats``
    times on the first ``th`` cores; medians."""
    runs: dict[str, list] = {"raw": [], "feeders": [], "no_feeders": []}
    for _ in range(repeats):
        raw_s, raw_n = raw_rate(plate, th)
        runs["raw"].append(raw_s)
        for name, extra in (("feeders", ()), ("no_feeders", ("--feeders", "0"))):
            r = null_run(plate, tmp / f"null{th}.zarr", th, chunk, extra=extra)
            assert raw_n == r["n_cells"] == n, (raw_n, r["n_cells"], n)
            runs[name].append(r)
            shutil.rmtree(tmp / f"null{th}.zarr", ignore_errors=True)
    raw_s = float(np.median(runs["raw"]))
    row = {"threads": th, "raw_decode_cut_cells_per_s": n / raw_s, "raw_s": runs["raw"]}
    for name in ("feeders", "no_feeders"):
        wall = float(np.median([r["wall_s"] for r in runs[name]]))
        embed = float(np.median([r["timing"]["embed_seconds"] for r in runs[name]]))
        row[name] = {
            "null_run_cells_per_s": n / wall,
            "null_embed_phase_cells_per_s": n / embed,
            "null_run_over_raw": raw_s / wall,
            "embed_phase_over_raw": raw_s / embed,
            "peak_pss_mb": float(np.median([r["peak_pss_mb"] for r in runs[name]])),
            "peak_rss_mb": float(np.median([r["peak_rss_mb"] for r in runs[name]])),
            "runs": runs[name],
        }
    f, z = row["feeders"], row["no_feeders"]
    print(f"  {th} core(s): raw {n / raw_s:.0f} c/s; null run {f['null_run_cells_per_s']:.0f} c/s (embed phase "
          f"{f['null_embed_phase_cells_per_s']:.0f}); --feeders 0: {z['null_run_cells_per_s']:.0f} "
          f"({z['null_embed_phase_cells_per_s']:.0f})", flush=True)  # fmt: skip
    return row


def _ceiling_table(rows: list[dict]) -> None:
    print(
        "| cores | raw decode + cut, cells/s | null-backend run, cells/s | its stream phase | run / raw | phase / raw "
        "| peak memory (PSS) MB | --feeders 0: run, cells/s | its stream phase | run / raw | phase / raw |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        f, z = r["feeders"], r["no_feeders"]
        print(
            f"| {r['threads']} | {r['raw_decode_cut_cells_per_s']:.0f} | {f['null_run_cells_per_s']:.0f} | "
            f"{f['null_embed_phase_cells_per_s']:.0f} | {f['null_run_over_raw']:.2f} | {f['embed_phase_over_raw']:.2f} "
            f"| {f['peak_pss_mb']:.0f} | {z['null_run_cells_per_s']:.0f} | {z['null_embed_phase_cells_per_s']:.0f} | "
            f"{z['null_run_over_raw']:.2f} | {z['embed_phase_over_raw']:.2f} |"
        )


def _scale_table(rows: list[dict]) -> None:
    print("\n| cells | wall s | cells/s | s per 1k cells | peak memory (PSS) MB | peak RSS summed MB |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['cells']} | {r['wall_s']:.1f} | {r['cells'] / r['wall_s']:.0f} | "
              f"{1000 * r['wall_s'] / r['cells']:.3f} | {r['peak_pss_mb']:.0f} | {r['peak_rss_mb']:.0f} |")  # fmt: skip


if __name__ == "__main__":
    main()
