"""Dynamic int8 forms side by side: speed and cosine to fp32 of each weight form ONNX Runtime's quantize_dynamic can
write, on three models: a seeded random ViT-S/16 at 224 px (the reference benchmark's model) on the packaged
neocortex check crops, the packaged ``default`` model (ViT-tiny/8 at 48 px) on the same crops, and a seeded untrained
ViT-tiny/8 at 40 px on the 516 held-out Jurkat cells (BF+DF).

Forms: unsigned per-tensor weights (``QUInt8``, the form before this benchmark), signed per-channel weights on 7 bits
(``reduce_range``, safe from the int16 saturation of CPUs without VNNI), signed per-channel on 8 bits, signed
per-tensor on 8 bits. Every model is exported and quantised with scdino-export's own functions; each form runs through
ONNX Runtime with ``--threads`` threads at the engine's CPU batch, the median of ``--repeats`` interleaved passes.

    python benchmarks/int8_forms.py [--repeats 3] [--threads 2] [--out benchmarks/results/int8_forms.json]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from harness import write_results

DATA = Path(__file__).parent / "data" / "jurkat_cellcycle"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--out", default="benchmarks/results/int8_forms.json")
    args = ap.parse_args()

    import torch
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from scdino.cells.cropstore import CropStore
    from scdino.data import packaged_crops
    from scdino.engine.config import cpu_batch_size
    from scdino.engine.pipeline import versions
    from scdino.export.onnx_export import export_onnx
    from scdino.export.quantize import DYNAMIC_FORMS, _embed, _session
    from scdino.export.verify import fit_crops
    from scdino.models import arch_config, build_model
    from scdino.models.card import describe_model

    # the forms quantize() tries, and signed per-tensor weights for comparison
    forms = {name: opts for name, opts, _ in DYNAMIC_FORMS} | {"int8 per tensor, 8 bit": {"weight_type": "QInt8"}}
    tmp = Path(tempfile.mkdtemp(prefix="scdino-int8-"))
    torch.manual_seed(0)
    vits = tmp / "vits16.pth"
    torch.save(build_model(arch_config("vit_small16")).state_dict(), vits)
    store = CropStore(DATA / "holdout.zarr")
    jurkat = store.read(np.arange(len(store.table())), [0, 2])
    neocortex = packaged_crops()
    cases = [
        ("random ViT-S/16 at 224", str(vits), {"channels": ("CTIP2", "BRN2", "ROR"), "input_size": 224}, neocortex),
        ("default (ViT-tiny/8 at 48)", "default", {"channels": ("CTIP2", "BRN2", "ROR")}, neocortex),
        ("untrained ViT-tiny/8 at 40 (Jurkat BF+DF)", "random:vit_tiny8", {"n_channels": 2, "input_size": 40}, jurkat),
    ]
    rows = []
    for name, model, kw, raw in cases:
        src = tmp / f"{len(rows)}.onnx"
        export_onnx(model, src, crop_size=raw.shape[-1], **kw)
        card = describe_model(str(src))
        crops = fit_crops(raw, card.in_chans, raw.shape[-1], "uint16")
        if len(crops) < 96:  # enough crops for a stable time
            crops = np.concatenate([crops] * (96 // len(crops) + 1))[:96]
        batch = cpu_batch_size(card.tokens)
        pre = tmp / "pre.onnx"
        quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
        paths = {"fp32": str(src)}
        for form, opts in forms.items():
            p = tmp / f"{src.stem}.{len(paths)}.onnx"
            opts = {**opts, "weight_type": getattr(QuantType, opts["weight_type"])}
            quantize_dynamic(str(pre), str(p), op_types_to_quantize=["MatMul", "Gemm"], **opts)
            paths[form] = str(p)
        sessions = {k: _session(p, args.threads) for k, p in paths.items()}
        times: dict[str, list[float]] = {k: [] for k in paths}
        emb = {k: _embed(s, crops[:batch], batch) for k, s in sessions.items()}  # warm-up
        for _ in range(args.repeats):
            for k, s in sessions.items():
                t = time.perf_counter()
                emb[k] = _embed(s, crops, batch)
                times[k].append(time.perf_counter() - t)
        ref = emb["fp32"].astype(np.float64)
        base = len(crops) / statistics.median(times["fp32"])
        print(f"\n{name}: {len(crops)} crops, batch {batch}, {args.threads} threads, median of {args.repeats}")
        print("| weights | cells/s | x fp32 | x uint8 | min cosine to fp32 | median cosine |")
        print("|---|---|---|---|---|---|")
        u8 = len(crops) / statistics.median(times["uint8"])
        for k in paths:
            e = emb[k].astype(np.float64)
            cos = (e * ref).sum(1) / np.linalg.norm(e, axis=1) / np.linalg.norm(ref, axis=1)
            cps = len(crops) / statistics.median(times[k])
            row = {
                "model": name,
                "weights": k,
                "crops": len(crops),
                "batch": batch,
                "cells_per_s": cps,
                "vs_fp32": cps / base,
                "vs_uint8": cps / u8,
                "min_cosine_to_fp32": float(cos.min()),
                "median_cosine_to_fp32": float(np.median(cos)),
                "seconds": times[k],
            }
            rows.append(row)
            print(
                f"| {k} | {cps:.1f} | {cps / base:.2f} | {cps / u8:.2f} | {row['min_cosine_to_fp32']:.5f} | "
                f"{row['median_cosine_to_fp32']:.6f} |"
            )
    result = {
        "benchmark": "int8_forms",
        "threads": args.threads,
        "repeats": args.repeats,
        "versions": versions(),
        "rows": rows,
    }
    write_results(args.out, result)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
