"""Wall times of k-NN evaluation (80/20 split, k=20, weighted vote) and UMAP (paper preset, umap-learn on the CPU)
for N cells of 384-dim embeddings: synthetic clustered vectors (8 classes), as the paper's ViT-S CLS tokens.

UMAP of more than --fit-max cells is fitted on a seeded subsample and the rest transformed (as the command does).
The first UMAP call of a process pays numba's compilation; it is timed separately ("warm-up").

    NUMBA_CACHE_DIR=/tmp/numba python benchmarks/analysis.py --sizes 8000 1000000
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np


def synthetic(n: int, d: int = 384, classes: int = 8, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(classes, d)).astype(np.float32)
    y = rng.integers(0, classes, n)
    x = np.empty((n, d), np.float32)
    for a in range(0, n, 100_000):
        x[a : a + 100_000] = centres[y[a : a + 100_000]] + 1.5 * rng.standard_normal(
            (min(100_000, n - a), d), dtype=np.float32
        )
    return x, y


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[8000, 1_000_000])
    ap.add_argument("--fit-max", type=int, default=200_000)
    ap.add_argument("--preset", default="immune")
    ap.add_argument("--out", default="benchmarks/results/analysis.json")
    args = ap.parse_args()
    import torch

    from scdino.engine.knn import evaluate_knn
    from scdino.engine.umap import PRESETS, fit_umap

    t = time.perf_counter()
    fit_umap(synthetic(500)[0], {**PRESETS[args.preset], "n_epochs": 10}, "cpu")
    warm = time.perf_counter() - t
    print(f"UMAP warm-up (numba compilation or cache load): {warm:.1f} s", flush=True)
    rows = []
    for n in args.sizes:
        x, y = synthetic(n)
        t = time.perf_counter()
        r = evaluate_knn(x, y, k=20, temperature=0.07)
        knn_s = time.perf_counter() - t
        print(f"  {n} cells: k-NN {knn_s:.1f} s (top-1 {r['top1']:.3f})", flush=True)
        t = time.perf_counter()
        _, info = fit_umap(x, PRESETS[args.preset], "cpu", fit_max=args.fit_max)
        umap_s = time.perf_counter() - t
        print(f"  {n} cells: UMAP {umap_s:.1f} s (fitted on {info['fitted_on']})", flush=True)
        rows.append(
            {
                "cells": n,
                "knn_s": knn_s,
                "knn_top1": r["top1"],
                "umap_s": umap_s,
                "umap_fitted_on": info["fitted_on"],
                "umap_transformed": info["transformed"],
            }
        )
    print(f"\n| cells | k-NN (80/20, k=20) s | UMAP ({args.preset}, 500 epochs) s | UMAP fitted on |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['cells']:,} | {r['knn_s']:.1f} | {r['umap_s']:.1f} | {r['umap_fitted_on']:,} |")
    res = {
        "benchmark": "analysis",
        "preset": args.preset,
        "umap_warmup_s": warm,
        "torch_threads": torch.get_num_threads(),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "results": rows,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
