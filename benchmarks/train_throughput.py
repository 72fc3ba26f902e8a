"""Training throughput (crops/s) of scdino-train with the full scDINO multi-crop recipe (2 x 224 + 8 x 96 views) for
ViT-tiny/16 and ViT-S/16, a few iterations each on real neocortex crops, side by side in one process.

    python benchmarks/train_throughput.py --iters 3 --batch 8
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--archs", nargs="+", default=["vit_tiny16", "vit_small16"])
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--global-size", type=int, default=224)
    ap.add_argument("--local-size", type=int, default=96)
    ap.add_argument("--out", default="benchmarks/results/train_throughput.json")
    args = ap.parse_args()
    import torch

    from scdino.engine.sample import write_sample_plate
    from scdino.training.config import build_config
    from scdino.training.loop import train

    tmp = Path(tempfile.mkdtemp(prefix="scdino-train-bench-"))
    plate = write_sample_plate(tmp / "neocortex.zarr", "neocortex")
    rows = []
    for arch in args.archs:
        fam, patch = arch.rstrip("0123456789"), int(arch[len(arch.rstrip("0123456789")) :])
        # iteration 0 pays one-off costs (allocations, first kernels): two epochs, the second one timed
        cfg = build_config(
            None,
            [
                f"global_size={args.global_size}",
                f"local_size={args.local_size}",
                "sigma=1",
                "min_distance=4",
                "min_area=15",
                "warmup_epochs=0",
                f"max_iters_per_epoch={args.iters}",
                "saveckp_freq=0",
            ],
            data=plate,
            out=str(tmp / arch),
            arch=fam,
            patch=patch,
            epochs=2,
            batch_size_per_device=args.batch,
            segment_channel="CTIP2,BRN2,ROR",
            crop_size=32,
            device="auto",
        )
        t = time.perf_counter()
        s = train(cfg)
        rows.append(
            {
                "arch": arch,
                "crops_per_s": s["crops_per_s"],
                "epoch_seconds": s["seconds"],
                "iters": args.iters,
                "batch": args.batch,
                "wall_s": time.perf_counter() - t,
            }
        )
        print(f"  {arch}: {s['crops_per_s']:.2f} crops/s", flush=True)
    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"
    print(f"\n2 x {args.global_size} + 8 x {args.local_size} views, batch {args.batch}, {dev}\n")
    print("| arch | crops/s |")
    print("|---|---|")
    for r in rows:
        print(f"| {r['arch']} | {r['crops_per_s']:.2f} |")
    res = {
        "benchmark": "train_throughput",
        "device": dev,
        "global_size": args.global_size,
        "local_size": args.local_size,
        "machine": {"platform": platform.platform()},
        "results": rows,
        "torch": torch.__version__,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
