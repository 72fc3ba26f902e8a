"""Batch size and threads of the CPU path, measured: ViT-S/16 at 224 px through the engine's ONNX Runtime backend (the
default path on a CPU) and PyTorch backend, on the shipped real nucleus crops.

For each backend x batch size x intra-op threads: cells/s, the median of ``--repeats`` passes over 128 crops after a
warm-up pass. The engine's defaults (batch 64, threads = cores / workers, one inter-op thread) should be at or near the
best row; the table says how far.

    python benchmarks/cpu_settings.py [--batches 16,64,128] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", default="16,64,128")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", default="benchmarks/results/cpu_settings.json")
    args = ap.parse_args()
    import torch

    from scdino.data import packaged_crops
    from scdino.engine.backends import open_backend
    from scdino.engine.backends.base import BackendSpec
    from scdino.export.onnx_export import export_onnx
    from scdino.export.verify import fit_crops
    from scdino.models import arch_config, build_model
    from scdino.models.card import describe_model

    tmp = Path(tempfile.mkdtemp(prefix="scdino-cpu-"))
    torch.manual_seed(0)
    ckpt = tmp / "vit_small16.pth"
    torch.save(build_model(arch_config("vit_small16")).state_dict(), ckpt)
    export_onnx(str(ckpt), tmp / "m.onnx", n_channels=3, crop_size=32)
    crops = fit_crops(np.resize(packaged_crops(), (128, 3, 48, 48)), 3, 32, "uint16")
    cores = os.cpu_count() or 1
    threads = sorted({1, max(1, cores // 2), cores})
    rows = []
    for kind, model in (("onnxruntime", str(tmp / "m.onnx")), ("torch", str(ckpt))):
        card = describe_model(model, n_channels=3)
        for t in threads:
            for b in [int(x) for x in args.batches.split(",")]:
                be = open_backend(BackendSpec(card=card, n_channels=3, kind=kind, batch_size=b, threads=t))
                be.infer(crops[:b])
                times = []
                for _ in range(args.repeats):
                    s = time.perf_counter()
                    be.infer(crops)
                    times.append(time.perf_counter() - s)
                be.close()
                rows.append({"backend": kind, "threads": t, "batch": b, "cells_per_s": len(crops) / np.median(times)})
                print(rows[-1], flush=True)
    best = max(r["cells_per_s"] for r in rows)
    print(f"\nViT-S/16 at 224 px, {len(crops)} real crops, {cores} cores, medians of {args.repeats}\n")
    print("| backend | intra-op threads | batch | cells/s | of the best |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['backend']} | {r['threads']} | {r['batch']} | {r['cells_per_s']:.2f} | "
            f"{100 * r['cells_per_s'] / best:.0f}% |"
        )
    res = {
        "benchmark": "cpu_settings",
        "rows": rows,
        "machine": {"cpus": cores, "platform": platform.platform(), "torch": torch.__version__},
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
