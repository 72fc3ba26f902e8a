"""Training throughput (crops/s) of scdino-train in fp32 and in bf16 autocast, side by side in one process, on real
Jurkat cells (``benchmarks/data/jurkat_cellcycle/train.zarr``, BF+DF, 40 px).

Recipes (ViT-tiny/8 at 40 px): ``two_views`` (the recipe search's two whole-cell views,
``benchmarks/train_recipes.py``), ``multicrop_16`` (2 x 40 + 4 locals of 16 px, the earlier recipe) and
``multicrop_24`` (2 x 40 + 4 locals of 24 px). Every measurement is one short run: two epochs of ``--iters`` steps,
the second timed (the first pays one-off costs); precisions alternate within each repeat, and the table gives the
median of ``--repeats`` and the bf16/fp32 ratio. ``auto`` is what ``precision=auto`` picks on this machine.

    python benchmarks/train_throughput.py [--iters 4] [--batch 32] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

from harness import machine, write_results

DATA = Path(__file__).parent / "data" / "jurkat_cellcycle" / "train.zarr"
RECIPES = {
    "two_views": {"local_crops": 0},
    "multicrop_16": {"local_crops": 4, "local_size": 16},
    "multicrop_24": {"local_crops": 4, "local_size": 24},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iters", type=int, default=4)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--recipes", default=",".join(RECIPES))
    ap.add_argument("--out", default="benchmarks/results/train_throughput.json")
    args = ap.parse_args()
    import numpy as np
    import torch

    from scdino.cells.cropstore import CropStore
    from scdino.cpu import has_native_bf16
    from scdino.training.config import build_config
    from scdino.training.loop import _precision, data_from_crops, train

    store = CropStore(DATA)
    names = list(store.channels)
    crops = torch.from_numpy(store.array[:][:, [names.index("BF"), names.index("DF")]].astype(np.int32))
    tmp = Path(tempfile.mkdtemp(prefix="scdino-train-bench-"))
    rows = []
    for recipe in args.recipes.split(","):
        speeds: dict[str, list[float]] = {"fp32": [], "bf16": []}
        for rep in range(args.repeats):
            for precision in ("fp32", "bf16"):
                sets = {
                    "arch": "vit_tiny",
                    "patch": 8,
                    "global_size": 40,
                    "global_scale": "1,1",
                    "aspect_ratio": "1,1",
                    "rotation": 180,
                    "intensity_scaling": "dataset",
                    "out_dim": 4096,
                    "epochs": 2,
                    "warmup_epochs": 0,
                    "batch_size_per_device": args.batch,
                    "max_iters_per_epoch": args.iters,
                    "saveckp_freq": 0,
                    "precision": precision,
                    "device": "cpu",
                    **RECIPES[recipe],
                }
                cfg = build_config(
                    None,
                    [f"{k}={v}" for k, v in sets.items()],
                    data=str(DATA),
                    out=str(tmp / f"{recipe}-{precision}-{rep}"),
                    channels=["BF", "DF"],
                )
                s = train(cfg, data=data_from_crops(cfg, crops, ["BF", "DF"]))
                speeds[precision].append(s["crops_per_s"])
                print(f"  {recipe} {precision} repeat {rep + 1}: {s['crops_per_s']:.1f} crops/s", flush=True)
        med = {p: float(np.median(v)) for p, v in speeds.items()}
        rows.append(
            {
                "recipe": recipe,
                **{f"{p}_crops_per_s": v for p, v in speeds.items()},
                **{f"{p}_median": v for p, v in med.items()},
                "bf16_over_fp32": med["bf16"] / med["fp32"],
            }
        )
    auto = _precision(build_config(None, [], data="d", out="o"), torch.device("cpu"))
    dev = f"CPU ({os.cpu_count()} cores), native bf16: {has_native_bf16()}"
    print(f"\nViT-tiny/8 at 40 px, batch {args.batch}, {args.iters} timed steps, median of {args.repeats}, {dev}")
    print(f"precision=auto picks {auto or 'fp32'} here\n")
    print("| recipe | fp32 crops/s | bf16 crops/s | bf16 / fp32 |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['recipe']} | {r['fp32_median']:.1f} | {r['bf16_median']:.1f} | {r['bf16_over_fp32']:.2f}x |")
    res = {
        "benchmark": "train_throughput",
        "device": dev,
        "auto_precision": str(auto or "fp32"),
        "settings": {"arch": "vit_tiny8", "input": 40, "batch": args.batch, "iters": args.iters},
        "machine": machine(threads=torch.get_num_threads()),
        "results": rows,
        "torch": torch.__version__,
    }
    write_results(args.out, res)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
