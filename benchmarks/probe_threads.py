"""How many BLAS threads should a linear-probe fit use? One fold of the probe (standardise, logistic regression) on
the raw pixels of the Jurkat training cells (2,064 cells x 3,200 values, BF+DF), fitted with BLAS's own thread count
and with one thread, alternating, ``--repeats`` times each; medians and their ratio from the same run. The load
average is printed beside them: the difference is largest when another process (a training run, a second
benchmark) keeps the cores busy.

    python benchmarks/probe_threads.py [--repeats 3] [--out benchmarks/results/probe_threads.json]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
import warnings
from pathlib import Path

import numpy as np
from harness import machine, print_table, write_results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "probe_threads.json"))
    args = ap.parse_args()
    from sklearn.exceptions import ConvergenceWarning
    from threadpoolctl import threadpool_info, threadpool_limits

    from scdino.cells.cropstore import CropStore
    from scdino.crossval import folds_of, probe_model
    from scdino.engine.evaluate import raw_pixel_features

    store = CropStore(Path(__file__).parent / "data" / "jurkat_cellcycle" / "train.zarr")
    x = raw_pixel_features(store.array[:][:, [store.channels.index(c) for c in ("BF", "DF")]])
    y = np.unique(store.table()["class"].astype(str).to_numpy(), return_inverse=True)[1]
    tr, te = folds_of(y, 5, 0)[0]
    default = max(i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas")
    times: dict[str, list[float]] = {"default": [], "1": []}
    accuracy, preds = {}, {}
    loads = []
    for _ in range(args.repeats):
        for name, limit in (("default", None), ("1", 1)):
            loads.append(os.getloadavg()[0])
            with threadpool_limits(limits=limit, user_api="blas"), warnings.catch_warnings():
                warnings.simplefilter("ignore", ConvergenceWarning)
                t0 = time.perf_counter()
                pred = probe_model(0).fit(x[tr], y[tr]).predict(x[te])
                times[name].append(time.perf_counter() - t0)
            accuracy[name] = float((pred == y[te]).mean())
            preds[name] = pred
    rows = [
        {
            "threads": f"{default} (BLAS default)" if name == "default" else name,
            "median_s": statistics.median(t),
            "runs": ", ".join(f"{v:.1f}" for v in t),
            "accuracy": accuracy[name],
        }
        for name, t in times.items()
    ]
    ratio = rows[0]["median_s"] / rows[1]["median_s"]
    print(f"one probe fold, {len(tr)} cells x {x.shape[1]} features; load average {min(loads):.1f}-{max(loads):.1f}")
    print_table(
        rows,
        [("BLAS threads", "threads", "s"), ("median s", "median_s", ".1f"), ("runs", "runs", "s"),
         ("fold accuracy", "accuracy", ".3f")],
    )  # fmt: skip
    same = int((preds["default"] == preds["1"]).sum())
    print(f"default / one thread: {ratio:.2f}x; the same prediction for {same} of {len(te)} cells")
    write_results(
        args.out,
        {
            "benchmark": "probe_threads",
            "cells": int(len(tr)),
            "features": int(x.shape[1]),
            "rows": rows,
            "ratio_default_over_one": ratio,
            "same_predictions": same,
            "query_cells": int(len(te)),
            "load_average": loads,
            "machine": machine(),
        },
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
