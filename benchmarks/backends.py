"""PyTorch vs ONNX Runtime fp32 vs ONNX Runtime int8 on the same real plate, side by side in one process.

Exports a DINO-layout ViT-S/16 (random weights, seeded: speed and numerical agreement do not depend on training)
adapted to the neocortex plate's 3 channels, quantises it (dynamic uint8 weights, and static QDQ), then runs
``scdino-engine run`` with each model ``--repeats`` times, interleaved, and reports median cells/s, the cosine of every
cell's embedding to the PyTorch one, and the k-NN top-1 (leave-one-out, k=20) of a pixel-derived label (each
nucleus' dominant marker) per backend.

    python benchmarks/backends.py --repeats 3 --input-size 224 --wells A/1
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import numpy as np
from harness import write_results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--input-size", type=int, help="Default: 224, or the trained model's own size")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--wells", default="A/1")
    ap.add_argument("--model", help="A trained model instead of the seeded random ViT-S/16 (e.g. default)")
    ap.add_argument("--out", default="benchmarks/results/backends.json")
    args = ap.parse_args()

    import anndata as ad
    import torch

    from scdino.cells.options import CellOptions
    from scdino.engine.pipeline import RunConfig, run, versions
    from scdino.engine.sample import neocortex_segment_params, write_sample_plate
    from scdino.export.onnx_export import export_onnx
    from scdino.export.quantize import quantize
    from scdino.knn import dominant_channel_labels, knn_predict
    from scdino.models import arch_config, build_model

    tmp = Path(tempfile.mkdtemp(prefix="scdino-bench-"))
    plate = write_sample_plate(tmp / "neocortex.zarr", "neocortex")
    chans = ("CTIP2", "BRN2", "ROR")
    crop = 32
    if args.model:
        ckpt = args.model
    else:
        torch.manual_seed(0)
        ckpt = tmp / "vits16.pth"
        torch.save(build_model(arch_config("vit_small16")).state_dict(), ckpt)
    onnx_fp32 = tmp / "m.onnx"
    meta = export_onnx(str(ckpt), onnx_fp32, channels=chans, crop_size=crop, input_size=args.input_size)
    size = meta["input_size"]
    models = {"torch fp32": str(ckpt), "onnxruntime fp32": str(onnx_fp32)}
    for method in ("dynamic", "static"):
        q = tmp / f"m.{method}.onnx"
        quantize(onnx_fp32, q, method=method)
        models[f"onnxruntime int8 {method}"] = str(q)
    cells = CellOptions(
        segment_channel=",".join(chans),
        crop_size=crop,
        wells=tuple(args.wells.split(",")),
        segment=neocortex_segment_params(),
    )
    times: dict[str, list[float]] = {k: [] for k in models}
    emb: dict[str, np.ndarray] = {}
    for r in range(args.repeats):
        for name, model in models.items():
            out = tmp / f"{name.replace(' ', '_')}.zarr"
            res = run(
                RunConfig(
                    plate=plate,
                    out=str(out),
                    model=model,
                    cells=cells,
                    input_size=size,
                    batch_size=args.batch_size,
                    overwrite=True,
                    progress=False,
                )
            )
            times[name].append(res.phase_seconds["embed_seconds"])
            print(
                f"  repeat {r + 1} {name}: {res.n_cells} cells, embedding {res.phase_seconds['embed_seconds']:.1f} s",
                flush=True,
            )
            if r == 0:
                a = ad.read_zarr(out)
                emb[name] = a.obsm["X_scdino"]
                n = a.n_obs
    # labels from the pixels: the dominant marker of each nucleus' crop
    from scdino.cells.plate import Plate
    from scdino.cells.table import read_crops

    table = ad.read_zarr(tmp / "torch_fp32.zarr").obs.reset_index(drop=True)
    crops = read_crops(Plate(plate), table, [0, 1, 2], crop)
    labels = dominant_channel_labels(crops)
    ref = emb["torch fp32"].astype(np.float64)
    rows = []
    for name in models:
        e = emb[name].astype(np.float64)
        cos = (e * ref).sum(1) / np.linalg.norm(e, axis=1) / np.linalg.norm(ref, axis=1)
        pred = knn_predict(emb[name], labels, emb[name], k=20, exclude_self=True)
        med = statistics.median(times[name])
        rows.append(
            {
                "backend": name,
                "cells": n,
                "median_embed_s": med,
                "cells_per_s": n / med,
                "min_cosine_to_torch": float(cos.min()),
                "median_cosine_to_torch": float(np.median(cos)),
                "knn_top1_dominant_marker": float((pred == labels).mean()),
                "embed_s": times[name],
            }
        )
    base = rows[0]["cells_per_s"]
    print(
        f"\n{meta['arch']} at {size} px, batch {args.batch_size}, {n} cells ({args.wells}), median of {args.repeats}\n"
    )
    print("| backend | cells/s | vs torch | min cosine to torch | k-NN top-1 (dominant marker) |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['backend']} | {r['cells_per_s']:.1f} | {r['cells_per_s'] / base:.2f}x | "
            f"{r['min_cosine_to_torch']:.5f} | {r['knn_top1_dominant_marker']:.3f} |"
        )
    result = {
        "benchmark": "backends",
        "model": args.model or "random vit_small16",
        "input_size": size,
        "batch_size": args.batch_size,
        "wells": args.wells,
        "repeats": args.repeats,
        "label_classes": np.bincount(labels).tolist(),
        "versions": versions(),
        "results": rows,
    }
    write_results(args.out, result)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
