"""Is bf16 a candidate for ``--precision auto`` on a CPU with native bf16? PyTorch fp32, PyTorch bf16 autocast,
ONNX Runtime fp32 and ONNX Runtime dynamic int8 (the form ``scdino-export quantize`` picks on this CPU), side by side
in one process on the same crops, at the engine's CPU batch: cells/s (median of ``--repeats`` interleaved passes)
and every crop's cosine to PyTorch fp32.

Models: a seeded random ViT-S/16 at 224 px (the reference benchmark's model) and the packaged ``default`` model
(ViT-tiny/8 at 48 px), on the packaged neocortex check crops (96, repeated where fewer). Where the CPU has no native
bf16 (``scdino.cpu.has_native_bf16``) PyTorch emulates it: the row is still measured and marked.

    python benchmarks/cpu_bf16.py [--repeats 3] [--threads 2] [--out benchmarks/results/cpu_bf16.json]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from harness import machine, print_table, write_results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--out", default="benchmarks/results/cpu_bf16.json")
    args = ap.parse_args()

    import torch

    from scdino.cpu import has_native_bf16
    from scdino.data import packaged_crops
    from scdino.engine.config import cpu_batch_size
    from scdino.engine.precision import cosines
    from scdino.export.onnx_export import export_onnx
    from scdino.export.quantize import _embed, _session, quantize
    from scdino.export.verify import fit_crops
    from scdino.models import arch_config, build_model
    from scdino.models.card import describe_model
    from scdino.preprocess import apply

    torch.set_num_threads(args.threads)
    tmp = Path(tempfile.mkdtemp(prefix="scdino-bf16-"))
    torch.manual_seed(0)
    vits = tmp / "vits16.pth"
    torch.save(build_model(arch_config("vit_small16")).state_dict(), vits)
    raw = packaged_crops()
    channels = ("CTIP2", "BRN2", "ROR")
    cases = [("random ViT-S/16 at 224", str(vits), 224), ("default (ViT-tiny/8 at 48)", "default", None)]
    bf16_name = "torch bf16 autocast" + ("" if has_native_bf16() else " (emulated: no native bf16)")
    rows = []
    for name, model, size in cases:
        onnx = tmp / f"{len(rows)}.onnx"
        export_onnx(model, onnx, channels=channels, crop_size=raw.shape[-1], input_size=size)
        int8 = tmp / f"{len(rows)}.int8.onnx"
        quantize(onnx, int8)
        card = describe_model(str(onnx))
        crops = fit_crops(raw, card.in_chans, raw.shape[-1], "uint16")
        crops = np.concatenate([crops] * (96 // len(crops) + 1))[:96]
        batch = cpu_batch_size(card.tokens)
        lm = describe_model(model, input_size=size, channels=channels).load()
        net = lm.model.eval()

        def torch_embed(c: np.ndarray, bf16: bool) -> np.ndarray:
            out = []
            with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                for i in range(0, len(c), batch):
                    out.append(net(apply(torch.from_numpy(c[i : i + batch]), lm.prep)).float().numpy())
            return np.concatenate(out)

        sessions = {
            k: _session(str(p), args.threads) for k, p in (("onnxruntime fp32", onnx), ("onnxruntime int8", int8))
        }
        paths = {
            "torch fp32": lambda c: torch_embed(c, False),
            bf16_name: lambda c: torch_embed(c, True),
            **{k: (lambda c, s=s: _embed(s, c, batch)) for k, s in sessions.items()},
        }
        emb = {k: fn(crops[:batch]) for k, fn in paths.items()}  # warm-up
        times: dict[str, list[float]] = {k: [] for k in paths}
        for _ in range(args.repeats):
            for k, fn in paths.items():
                t = time.perf_counter()
                emb[k] = fn(crops)
                times[k].append(time.perf_counter() - t)
        base = len(crops) / statistics.median(times["torch fp32"])
        for k in paths:
            cos = cosines(emb[k], emb["torch fp32"])
            cps = len(crops) / statistics.median(times[k])
            rows.append({
                "model": name, "path": k, "crops": len(crops), "batch": batch, "cells_per_s": round(cps, 1),
                "vs_torch_fp32": round(cps / base, 2), "min_cosine": round(float(cos.min()), 6), "seconds": times[k],
            })  # fmt: skip
    print_table(rows, [("model", "model", "s"), ("path", "path", "s"), ("cells/s", "cells_per_s", ".1f"),
                       ("x torch fp32", "vs_torch_fp32", ".2f"), ("min cosine to fp32", "min_cosine", ".6f")])  # fmt: skip
    res = {"benchmark": "cpu_bf16", "native_bf16": bf16_name.endswith("autocast"), "threads": args.threads,
           "repeats": args.repeats, "rows": rows, "machine": machine()}  # fmt: skip
    print(f"wrote {write_results(args.out, res)}")


if __name__ == "__main__":
    main()
