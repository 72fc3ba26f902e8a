"""Batch size and threads of the CPU path, measured: ViTs through the engine's ONNX Runtime backend (the default path
on a CPU) and PyTorch backend, on the shipped real nucleus crops.

For each model x backend x batch size x intra-op threads: cells/s, the median of ``--repeats`` passes over
``--cells`` crops after a warm-up pass. Models are ``ARCH@INPUT`` (random weights in DINO's layout: speed does not
depend on their values); each row also gives the tokens per image, as the best batch size follows the tokens a batch
holds (``scdino.engine.config.cpu_batch_size``).

    python benchmarks/cpu_settings.py [--models vit_small16@224] [--batches 16,64,128] [--threads 2] [--repeats 2]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
from harness import write_results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="vit_small16@224", help="ARCH@INPUT,... (default vit_small16@224)")
    ap.add_argument("--batches", default="16,64,128")
    ap.add_argument("--threads", help="intra-op threads to try, e.g. 1,2 (default: 1, half the cores, all cores)")
    ap.add_argument("--cells", type=int, default=128, help="crops per timed pass")
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
    crops = np.resize(packaged_crops(), (args.cells, 3, 48, 48))
    cores = os.cpu_count() or 1
    threads = [int(t) for t in args.threads.split(",")] if args.threads else sorted({1, max(1, cores // 2), cores})
    rows = []
    for m in args.models.split(","):
        arch, size = m.split("@")
        torch.manual_seed(0)
        ckpt = tmp / f"{arch}.pth"
        torch.save(build_model(arch_config(arch)).state_dict(), ckpt)
        onnx = tmp / f"{arch}_{size}.onnx"
        export_onnx(str(ckpt), onnx, n_channels=3, crop_size=32, input_size=int(size))
        x = fit_crops(crops, 3, 32, "uint16")
        for kind, model in (("onnxruntime", str(onnx)), ("torch", str(ckpt))):
            card = describe_model(model, n_channels=3, input_size=int(size) if kind == "torch" else None)
            tokens = (int(size) // arch_config(arch).patch_size) ** 2 + 1
            for t in threads:
                for b in [int(v) for v in args.batches.split(",")]:
                    be = open_backend(BackendSpec(card=card, n_channels=3, kind=kind, batch_size=b, threads=t))
                    be.infer(x[:b])
                    times = []
                    for _ in range(args.repeats):
                        s = time.perf_counter()
                        be.infer(x)
                        times.append(time.perf_counter() - s)
                    be.close()
                    rows.append(
                        {"model": m, "tokens": tokens, "backend": kind, "threads": t, "batch": b,
                         "cells_per_s": len(x) / np.median(times)}
                    )  # fmt: skip
                    print(rows[-1], flush=True)
    print(f"\n{len(crops)} real crops, {cores} cores, medians of {args.repeats}\n")
    print("| model | tokens | backend | intra-op threads | batch | cells/s | of the best of this model and backend |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        best = max(q["cells_per_s"] for q in rows if (q["model"], q["backend"]) == (r["model"], r["backend"]))
        print(
            f"| {r['model']} | {r['tokens']} | {r['backend']} | {r['threads']} | {r['batch']} | "
            f"{r['cells_per_s']:.1f} | {100 * r['cells_per_s'] / best:.0f}% |"
        )
    res = {
        "benchmark": "cpu_settings",
        "rows": rows,
    }
    write_results(args.out, res)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
