"""Throughput of ``scdino-engine run`` on the real neocortex sample plate.

Runs the whole command path (plate -> segmentation -> crops -> Dask -> backend -> store) ``--repeats`` times
for each setting, side by side in one process, and reports medians. Prints a markdown table and writes JSON with
the machine, versions and settings.

    python benchmarks/engine_throughput.py --repeats 3 --settings random:vit_small16@224 random:vit_small16@112
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from harness import write_results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--settings", nargs="+", default=["random:vit_small16@224"], help="MODEL@INPUT_SIZE entries to compare"
    )
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--out", default="benchmarks/results/engine_throughput.json")
    args = ap.parse_args()

    from scdino.cells.options import CellOptions
    from scdino.engine.pipeline import RunConfig, run, versions
    from scdino.engine.sample import neocortex_segment_params, write_sample_plate

    tmp = Path(tempfile.mkdtemp(prefix="scdino-bench-"))
    plate = write_sample_plate(tmp / "neocortex.zarr", "neocortex")
    cells = CellOptions(segment_channel="CTIP2,BRN2,ROR", crop_size=32, segment=neocortex_segment_params())
    rows = []
    for setting in args.settings:
        model, size = setting.rsplit("@", 1)
        runs = []
        for r in range(args.repeats):
            t = time.perf_counter()
            res = run(
                RunConfig(
                    plate=plate,
                    out=str(tmp / "cells.zarr"),
                    model=model,
                    cells=cells,
                    input_size=int(size),
                    batch_size=args.batch_size,
                    workers=args.workers,
                    overwrite=True,
                    progress=False,
                )
            )
            wall = time.perf_counter() - t
            runs.append({"cells": res.n_cells, "wall_s": wall, **res.phase_seconds})
            print(
                f"  {setting} run {r + 1}: {res.n_cells} cells, {wall:.1f} s wall, "
                f"embed {res.phase_seconds['embed_seconds']:.1f} s",
                flush=True,
            )
        n = runs[0]["cells"]
        rows.append(
            {
                "setting": setting,
                "cells": n,
                "runs": runs,
                "median_wall_s": statistics.median(r["wall_s"] for r in runs),
                "median_embed_s": statistics.median(r["embed_seconds"] for r in runs),
                "cells_per_s_end_to_end": n / statistics.median(r["wall_s"] for r in runs),
                "cells_per_s_embedding": n / statistics.median(r["embed_seconds"] for r in runs),
            }
        )
    print("\n| setting | cells | median wall s | cells/s end to end | cells/s embedding phase |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['setting']} | {r['cells']} | {r['median_wall_s']:.1f} | {r['cells_per_s_end_to_end']:.1f} | "
            f"{r['cells_per_s_embedding']:.1f} |"
        )
    result = {
        "benchmark": "engine_throughput",
        "plate": "neocortex sample",
        "repeats": args.repeats,
        "batch_size": args.batch_size,
        "workers": args.workers,
        "versions": versions(),
        "results": rows,
    }
    write_results(args.out, result)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
