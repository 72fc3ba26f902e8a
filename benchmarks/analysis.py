"""Wall times of k-NN evaluation (80/20 split, k=20, weighted vote) and UMAP (paper preset, umap-learn on the CPU)
for N cells of 384-dim embeddings: synthetic clustered vectors (8 classes), as the paper's ViT-S CLS tokens.

UMAP of more than --fit-max cells is fitted on a seeded subsample and the rest transformed (as the command does).
The first UMAP call of a process pays numba's compilation; it is timed separately ("warm-up").

For sizes above --measure-max (default 100,000) the work is sampled, and the table says so: k-NN times the first
--sample-queries queries against the full reference set and scales by the number of queries (every query costs the
same: one row of the exact similarity matrix); UMAP times the full fit on --fit-max cells and the transform of
--sample-transform of the remaining cells, scaled to all of them.

    NUMBA_CACHE_DIR=/tmp/numba python benchmarks/analysis.py --sizes 8000 1000000
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from harness import write_results


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
    ap.add_argument("--measure-max", type=int, default=100_000)
    ap.add_argument("--sample-queries", type=int, default=20_000)
    ap.add_argument("--sample-transform", type=int, default=100_000)
    ap.add_argument("--out", default="benchmarks/results/analysis.json")
    args = ap.parse_args()
    import torch

    from scdino.engine.umap import PRESETS, fit_umap
    from scdino.knn import evaluate_knn

    t = time.perf_counter()
    fit_umap(synthetic(500)[0], {**PRESETS[args.preset], "n_epochs": 10}, "cpu")
    warm = time.perf_counter() - t
    print(f"UMAP warm-up (numba compilation or cache load): {warm:.1f} s", flush=True)
    rows = []
    for n in args.sizes:
        x, y = synthetic(n)
        sampled = n > args.measure_max
        t = time.perf_counter()
        if not sampled:
            r = evaluate_knn(x, y, k=20, temperature=0.07)
            knn_s, top1 = time.perf_counter() - t, r["top1"]
        else:  # the same split and vote, on the first queries only; each query costs the same
            from scdino.knn import knn_predict, split

            tr, te, _ = split(y, 0.8, 0)
            q = te[: args.sample_queries]
            t = time.perf_counter()
            pred = knn_predict(x[tr], y[tr], x[q], k=20, temperature=0.07, n_classes=int(y.max()) + 1)
            knn_s = (time.perf_counter() - t) * len(te) / len(q)
            top1 = float((pred == y[q]).mean())
        note = f" (scaled from {args.sample_queries} queries)" if sampled else ""
        print(f"  {n} cells: k-NN {knn_s:.1f} s{note}", flush=True)
        params = PRESETS[args.preset]
        if not sampled:
            t = time.perf_counter()
            _, info = fit_umap(x, params, "cpu", fit_max=args.fit_max)
            umap_s, fit_s, transform_s = time.perf_counter() - t, None, None
        else:  # the command's own path: fit on a seeded subsample, transform the rest (timed on a sample)
            from umap import UMAP

            rng = np.random.default_rng(0)
            idx = rng.permutation(n)
            fit_idx, rest = idx[: args.fit_max], idx[args.fit_max :]
            reducer = UMAP(
                n_neighbors=params["n_neighbors"],
                min_dist=params["min_dist"],
                spread=params["spread"],
                n_epochs=params["n_epochs"],
                metric=params["metric"],
                random_state=0,
            )
            t = time.perf_counter()
            reducer.fit_transform(x[fit_idx])
            fit_s = time.perf_counter() - t
            part = rest[: args.sample_transform]
            t = time.perf_counter()
            reducer.transform(x[part])
            transform_s = (time.perf_counter() - t) * len(rest) / len(part)
            umap_s = fit_s + transform_s
            info = {"fitted_on": len(fit_idx), "transformed": len(rest)}
        print(f"  {n} cells: UMAP {umap_s:.1f} s (fitted on {info['fitted_on']})", flush=True)
        rows.append(
            {
                "cells": n,
                "knn_s": knn_s,
                "knn_top1": top1,
                "umap_s": umap_s,
                "umap_fit_s": fit_s,
                "umap_transform_s": transform_s,
                "umap_fitted_on": info["fitted_on"],
                "umap_transformed": info["transformed"],
                "sampled": sampled,
                "sample_queries": args.sample_queries if sampled else None,
                "sample_transform": args.sample_transform if sampled else None,
            }
        )
    print(f"\n| cells | k-NN (80/20, k=20) s | UMAP ({args.preset}, 500 epochs) s | UMAP fitted on | measured |")
    print("|---|---|---|---|---|")
    for r in rows:
        how = (
            f"k-NN: {r['sample_queries']:,} queries scaled; UMAP: fit {r['umap_fit_s']:.0f} s + transform of "
            f"{r['sample_transform']:,} scaled to {r['umap_transformed']:,} ({r['umap_transform_s']:.0f} s)"
            if r["sampled"]
            else "in full"
        )
        print(f"| {r['cells']:,} | {r['knn_s']:.1f} | {r['umap_s']:.1f} | {r['umap_fitted_on']:,} | {how} |")
    res = {
        "benchmark": "analysis",
        "preset": args.preset,
        "umap_warmup_s": warm,
        "torch_threads": torch.get_num_threads(),
        "results": rows,
    }
    write_results(args.out, res)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
