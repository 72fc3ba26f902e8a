"""Embedding throughput of a local Dask worker with and without Dask's ``MALLOC_TRIM_THRESHOLD_`` (which switches off
glibc's adaptive mmap threshold), alternating the two, on the neocortex sample plate's well A/1 with ViT-S/16 at 224.

    python benchmarks/worker_malloc.py [--repeats 3] [--out benchmarks/results/worker_malloc.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from harness import write_results

RUN = """
import json, sys
from scdino.cells.options import CellOptions
from scdino.engine.pipeline import RunConfig, run
from scdino.engine.sample import neocortex_segment_params
if __name__ == "__main__":
    seg = neocortex_segment_params()
    cells = CellOptions(segment_channel="CTIP2,BRN2,ROR", crop_size=32, wells=("A/1",), segment=seg)
    r = run(RunConfig(plate=sys.argv[1], out=sys.argv[2], model="random:vit_small16", input_size=224, cells=cells,
                      progress=False, overwrite=True))
    print(json.dumps({"cells": r.n_cells, "embed_seconds": r.phase_seconds["embed_seconds"]}))
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="benchmarks/results/worker_malloc.json")
    args = ap.parse_args()
    from scdino.engine.sample import write_sample_plate

    tmp = Path(tempfile.mkdtemp(prefix="scdino-malloc-"))
    plate = write_sample_plate(tmp / "neocortex.zarr", "neocortex")
    script = tmp / "run_once.py"
    script.write_text(RUN)
    rates: dict[str, list[float]] = {"Dask's MALLOC_TRIM_THRESHOLD_": [], "adaptive (scdino's default)": []}
    for r in range(args.repeats):
        for name, flag in (("Dask's MALLOC_TRIM_THRESHOLD_", "1"), ("adaptive (scdino's default)", "0")):
            env = {**os.environ, "SCDINO_DASK_MALLOC_TRIM": flag}
            p = subprocess.run(
                [sys.executable, str(script), plate, str(tmp / "o.zarr")],
                env=env,
                check=True,
                capture_output=True,
                text=True,
            )
            res = json.loads(p.stdout.strip().splitlines()[-1])
            rates[name].append(res["cells"] / res["embed_seconds"])
            print(f"repeat {r + 1}: {name}: {rates[name][-1]:.2f} cells/s", flush=True)
    med = {k: statistics.median(v) for k, v in rates.items()}
    base = med["Dask's MALLOC_TRIM_THRESHOLD_"]
    print("\n| worker allocator | cells/s (median) | ratio |\n|---|---|---|")
    for k, v in med.items():
        print(f"| {k} | {v:.2f} | {v / base:.2f}x |")
    out = {
        "settings": {
            "model": "random:vit_small16",
            "input_size": 224,
            "cells": "neocortex A/1",
            "repeats": args.repeats,
        },
        "cells_per_s": rates,
        "median": med,
    }
    write_results(args.out, out, indent=2)


if __name__ == "__main__":
    main()
