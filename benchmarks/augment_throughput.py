"""Multi-crop augmentation: batched on the device (what scdino-train does) against the same work done one crop at a
time (what a per-sample data-loader transform does), side by side on the same real crops.

The per-sample path calls the same MultiCrop on batches of one, so the two differ only in batching, not in the
operations. Views: the recipe's 2 x 224 + 8 x 96 and the default model's 2 x 48 + 6 x 24. Medians of --repeats.

    python benchmarks/augment_throughput.py [--batch 32] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

from harness import write_results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="cuda" if _cuda() else "cpu")
    ap.add_argument("--out", default="benchmarks/results/augment_throughput.json")
    args = ap.parse_args()
    import numpy as np
    import torch

    from scdino.engine.sample import verification_crops
    from scdino.training.augment import MultiCrop, make_generator
    from scdino.training.config import TrainConfig

    dev = torch.device(args.device)
    crops = verification_crops(n=args.batch, crop=32).astype(np.int32)
    raw = torch.from_numpy(crops).to(dev)
    rows = []
    for name, over in (
        ("recipe 2x224 + 8x96", {}),
        ("default model 2x48 + 6x24", {"global_size": 48, "local_size": 24, "local_crops": 6}),
    ):
        cfg = TrainConfig(**over)
        aug = MultiCrop(cfg, torch.zeros(3, device=dev), torch.ones(3, device=dev))

        def batched(it: int) -> None:
            aug(raw, make_generator(0, 0, it, dev))

        def per_sample(it: int) -> None:
            for i in range(len(raw)):
                aug(raw[i : i + 1], make_generator(0, 0, it, dev), len(raw), i)

        times = {}
        for label, fn in (("batched", batched), ("per-sample", per_sample)):
            fn(0)  # warm-up
            t = []
            for r in range(args.repeats):
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                fn(r + 1)
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                t.append(time.perf_counter() - t0)
            times[label] = len(raw) / statistics.median(t)
        rows.append(
            {
                "views": name,
                "batched_crops_per_s": times["batched"],
                "per_sample_crops_per_s": times["per-sample"],
                "ratio": times["batched"] / times["per-sample"],
            }
        )
    print(f"\nmulti-crop augmentation on {dev}, batch {args.batch}, medians of {args.repeats}\n")
    print("| views | batched crops/s | per-sample crops/s | batched / per-sample |")
    print("|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['views']} | {r['batched_crops_per_s']:.0f} | {r['per_sample_crops_per_s']:.0f} | {r['ratio']:.1f}x |"
        )
    res = {
        "benchmark": "augment_throughput",
        "device": str(dev),
        "batch": args.batch,
        "results": rows,
    }
    write_results(args.out, res)
    print(f"\nwrote {args.out}")


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    main()
