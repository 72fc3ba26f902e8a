"""Time and peak memory of profiles and the single-cell export at 100,000 and 1,000,000 cells.

A synthetic embeddings store (384 dims, ViT-S) of a 384-well plate with 4 fields per well is written as ``run`` writes
one; each measured step runs in a fresh process, whose peak resident memory is read from the OS afterwards.

    python benchmarks/profiles_scale.py [--sizes 100000,1000000] [--out benchmarks/results/profiles_scale.json]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from harness import machine

STEPS = {
    "profiles (median)": "from scdino.engine.profiles import profiles, ProfileOptions as O; "
    "profiles('{store}', '{tmp}/p_median.parquet', O(agg='median', normalise='robust'))",
    "profiles (mean)": "from scdino.engine.profiles import profiles, ProfileOptions as O; "
    "profiles('{store}', '{tmp}/p_mean.parquet', O(agg='mean', normalise='robust'))",
    "export-cells": "from scdino.engine.profiles import export_cells; export_cells('{store}', '{tmp}/cells.parquet')",
}


def write_store(path: Path, n: int, dim: int = 384, seed: int = 0) -> None:
    import pandas as pd

    from scdino.engine.output import EmbeddingStore

    rows = [f"{chr(65 + r)}/{c + 1}" for r in range(16) for c in range(24)]
    well = np.repeat(np.arange(384), -(-n // 384))[:n]
    field = (np.arange(n) % 4).astype(str)
    table = pd.DataFrame(
        {
            "plate": "bench",
            "well": np.asarray(rows)[well],
            "field": field,
            "label": np.arange(n) + 1,
            "border": np.arange(n) % 17 == 0,
        }
    )
    chunk = 16384
    store = EmbeddingStore.create(str(path), table, dim, chunk, {"status": "running"}, "bench")
    rng = np.random.default_rng(seed)
    for i in range(store.n_blocks):
        a, b = store.block_range(i)
        x = rng.standard_normal((b - a, dim), dtype=np.float32) + well[a:b, None].astype(np.float32) / 100
        store.write_block(i, x)
    store.finish({"status": "complete"})


def measure(code: str) -> tuple[float, float]:
    """(seconds, peak resident MB) of ``code`` run in a fresh Python process, which reports its own peak: VmHWM of
    its address space (``ru_maxrss`` would also count the parent's pages the child had before exec)."""
    probe = "; print('PEAK', next(int(ln.split()[1]) for ln in open('/proc/self/status') if ln.startswith('VmHWM')))"
    t = time.perf_counter()
    p = subprocess.run([sys.executable, "-c", code + probe], check=True, capture_output=True, text=True)
    seconds = time.perf_counter() - t
    peak_kb = int(next(ln.split()[1] for ln in p.stdout.splitlines() if ln.startswith("PEAK")))
    return seconds, peak_kb / 1024


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="100000,1000000")
    ap.add_argument("--out", default="benchmarks/results/profiles_scale.json")
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    base = Path(tempfile.mkdtemp(prefix="scdino-profiles-"))
    results = []
    baseline_s, baseline_mb = measure("import scdino.engine.profiles, pandas, pyarrow, zarr, anndata")
    try:
        for n in sizes:
            store = base / f"cells_{n}.zarr"
            t = time.perf_counter()  # written by a child too, so that this process stays small
            subprocess.run(
                [
                    sys.executable,
                    "-c",
                    f"import profiles_scale as p; p.write_store(__import__('pathlib').Path('{store}'), {n})",
                ],
                check=True,
                cwd=str(Path(__file__).resolve().parent),
            )
            write_s = time.perf_counter() - t
            for name, code in STEPS.items():
                seconds, mb = measure(code.format(store=store, tmp=base))
                results.append({"cells": n, "step": name, "seconds": round(seconds, 1), "peak_mb": round(mb)})
                print(f"{n:>9} cells  {name:<18} {seconds:7.1f} s  peak {mb:7.0f} MB", flush=True)
            results.append({"cells": n, "step": "write synthetic store", "seconds": round(write_s, 1)})
            shutil.rmtree(store)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    print("\n| cells | step | seconds | peak memory (MB) |\n|---|---|---|---|")
    for r in results:
        if "peak_mb" in r:
            print(f"| {r['cells']:,} | {r['step']} | {r['seconds']} | {r['peak_mb']} |")
    out = {
        "machine": machine(),
        "settings": {"dim": 384, "wells": 384, "fields_per_well": 4, "block_rows": 16384},
        "import_only": {"seconds": round(baseline_s, 1), "peak_mb": round(baseline_mb)},
        "results": results,
    }
    Path(args.out).write_text(json.dumps(out, indent=2))
    print(f"\nimport alone: peak {baseline_mb:.0f} MB; results in {args.out}")


if __name__ == "__main__":
    main()
