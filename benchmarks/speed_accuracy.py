"""Speed and its accuracy cost on real labelled cells: a label-free model (``--model PATH``, e.g. a ViT-tiny/8 trained
at 40 px on BF+DF by ``benchmarks/train_recipes.py``) on the held-out Jurkat cells, for each precision (fp32 PyTorch, fp32 ONNX Runtime, int8
dynamic, int8 static) and input size (native 40 px, 112, and fast mode's 16 px; 224 would be a 5.6x upsampling of
these 40 px cells, only slower).

Each setting is exported and quantised with ``scdino-export``'s own functions (verified as the command verifies),
then embeds the 516 held-out cells in this process through the engine's backend (batch 64, ``--threads``), timed as
the median of ``--repeats`` passes after a warm-up. k-NN (k=20, T=0.07) on stratified 80/20 splits of the held-out
cells over ``--seeds`` seeds: mean top-1 and balanced accuracy.
Cosine: each setting against fp32 PyTorch at the same size.

    python benchmarks/speed_accuracy.py --model MODEL.pth [--repeats 2] [--seeds 20] [--threads N] [--out ...]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
from harness import write_results

DATA = Path(__file__).parent / "data" / "jurkat_cellcycle"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--model",
        required=True,
        help="a BF+DF model of the Jurkat cells (a scdino-train checkpoint, e.g. one kept by train_recipes.py)",
    )
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--seeds", type=int, default=20)
    ap.add_argument("--sizes", default="40,112,16")
    ap.add_argument("--threads", type=int, help="threads of every setting (default: all cores)")
    ap.add_argument("--out", default="benchmarks/results/speed_accuracy.json")
    args = ap.parse_args()
    MODEL = args.model  # noqa: N806
    from scdino.cells.cropstore import CropStore
    from scdino.engine.backends import open_backend
    from scdino.engine.backends.base import BackendSpec
    from scdino.export.onnx_export import export_onnx
    from scdino.export.quantize import quantize
    from scdino.knn import evaluate_knn
    from scdino.models.card import describe_model

    store = CropStore(DATA / "holdout.zarr")
    crops = store.read(np.arange(len(store.table())), [0, 2])
    labels = store.table()["class"].astype(str).to_numpy()
    calib = CropStore(DATA / "train.zarr").read(np.arange(64), [0, 2])  # calibration from training cells only
    tmp = Path(tempfile.mkdtemp(prefix="scdino-speed-"))
    threads = args.threads or os.cpu_count() or 1
    rows = []

    def measure(model: str, kind: str, size: int | None) -> tuple[float, np.ndarray]:
        card = describe_model(model, n_channels=2, input_size=size if kind == "torch" else None)
        b = open_backend(BackendSpec(card=card, n_channels=2, kind=kind, batch_size=64, threads=threads))
        b.infer(crops[:64])
        times, emb = [], None
        for _ in range(args.repeats):
            t = time.perf_counter()
            emb = b.infer(crops)
            times.append(time.perf_counter() - t)
        b.close()
        return len(crops) / float(np.median(times)), emb

    for size in [int(s) for s in args.sizes.split(",")]:
        fp32 = tmp / f"m{size}.onnx"
        export_onnx(MODEL, fp32, crop_size=40, input_size=size, verify_with=calib)
        settings = [("fp32, PyTorch", MODEL, "torch")]
        settings.append(("fp32, ONNX Runtime", str(fp32), "onnxruntime"))
        for method in ("dynamic", "static"):
            q = tmp / f"m{size}.{method}.onnx"
            quantize(fp32, q, method=method, calibration=calib, min_cosine=0.0)
            settings.append((f"int8 {method}, ONNX Runtime", str(q), "onnxruntime"))
        ref = None
        for name, model, kind in settings:
            speed, emb = measure(model, kind, size)
            if ref is None:
                ref = emb
            cos = (emb * ref).sum(1) / np.linalg.norm(emb, axis=1) / np.linalg.norm(ref, axis=1)
            acc = [evaluate_knn(emb, labels, seed=s) for s in range(args.seeds)]
            rows.append(
                {
                    "input_size": size,
                    "setting": name,
                    "cells_per_s": speed,
                    "min_cosine_to_fp32": float(cos.min()),
                    "top1": float(np.mean([a["top1"] for a in acc])),
                    "balanced": float(np.mean([a["balanced_accuracy"] for a in acc])),
                }
            )
            print(rows[-1], flush=True)
    base = next(r for r in rows if r["input_size"] == 40 and r["setting"] == "fp32, PyTorch")
    print(
        f"\n{len(crops)} held-out Jurkat cells, {MODEL} (BF+DF), batch 64, {threads} thread(s); k-NN over "
        f"{args.seeds} splits of the held-out cells; speed relative to fp32 PyTorch at the native 40 px\n"
    )
    print("| input px | precision, backend | cells/s | x | min cosine to fp32 | k-NN top-1 | balanced |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['input_size']} | {r['setting']} | {r['cells_per_s']:.0f} | "
            f"{r['cells_per_s'] / base['cells_per_s']:.2f} | {r['min_cosine_to_fp32']:.4f} | "
            f"{100 * r['top1']:.1f} | {100 * r['balanced']:.1f} |"
        )
    res = {
        "benchmark": "speed_accuracy",
        "model": MODEL,
        "cells": len(crops),
        "threads": threads,
        "rows": rows,
    }
    write_results(args.out, res)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
