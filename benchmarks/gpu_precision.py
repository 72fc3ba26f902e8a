"""PyTorch on CUDA in fp16 autocast (the engine's default) against bf16 autocast, each held to the CPU's fp32 on real
labelled cells: speed, every cell's cosine to fp32, and whether k-NN on the GPU's embeddings predicts what it predicts
on fp32's.

The cells: the labelled Jurkat cells shipped in ``benchmarks/data/jurkat_cellcycle/`` (real cells, 40 x 40 px, BF,
DNA and DF, seven cell-cycle classes; its README), read from their crop stores: ``train.zarr`` the k-NN reference,
``holdout.zarr`` the queries. The model: a seeded random ViT-S/16 at 224 px (``gpu_pipeline.py``'s), through the
engine's torch backend, ``BackendSpec(..., autocast="float16" | "bfloat16")``. The same crops are embedded once on the
CPU in fp32 (the reference) and once per precision on CUDA. For each precision:

- cells/s of the backend on CUDA (raw uint16 crops in: staging, preprocessing and forward on the GPU), the median of
  ``--repeats`` passes over ``--timing-cells`` crops (the cells, repeated) after a warm-up;
- every cell's cosine to its CPU fp32 embedding: min, 1st percentile, mean;
- k-NN (``scdino.knn.knn_predict``: k=20, cosine): the training cells the reference, every held-out cell a query; the
  share of held-out cells whose predicted class is the one CPU fp32's embeddings give (agreement), and top-1 accuracy
  against the true classes, fp32's beside it.

Where CUDA is missing each CUDA row is skipped with the reason in one line, and a second CPU fp32 pass at another batch
size is held to the first instead, so that the comparison itself still runs. Prints a table, writes JSON.

    python benchmarks/gpu_precision.py [--model random:vit_small16] [--input-size 224] [--out ...]
    python benchmarks/gpu_precision.py --cpu-dry-run    # ViT-test/16 at 32 px on 96 + 48 of the cells, on the CPU
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from harness import machine, print_table, unimportable, write_results

DATA = Path(__file__).parent / "data" / "jurkat_cellcycle"
NEEDED = ("torch", "numpy", "zarr", "anndata", "scdino.cells.cropstore", "scdino.engine.backends.torch_backend")
PRECISIONS = ("float16", "bfloat16")


def load(name: str, n: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Crops (n, 3, 40, 40) uint16 and class names of a Jurkat store; ``n`` evenly spaced cells of it, or all."""
    from scdino.cells.cropstore import CropStore

    store = CropStore(DATA / f"{name}.zarr")
    crops = np.asarray(store.array[:])
    labels = store.table()["class"].astype(str).to_numpy()
    if n is not None and n < len(crops):
        pick = np.linspace(0, len(crops) - 1, n).round().astype(int)
        crops, labels = crops[pick], labels[pick]
    return crops, labels


def backend(model: str, input_size: int, device: str, batch: int, autocast: str = "float16"):
    from scdino.engine.backends.base import BackendSpec
    from scdino.engine.backends.torch_backend import TorchBackend
    from scdino.models.card import describe_model

    card = describe_model(model, n_channels=3, input_size=input_size)
    spec = BackendSpec(card=card, n_channels=3, kind="torch", device=device, batch_size=batch, autocast=autocast)
    return TorchBackend(spec)


def timed(b, crops: np.ndarray, repeats: int, cuda: bool) -> float:
    """Median cells/s of ``repeats`` passes over ``crops`` after a warm-up."""
    import torch

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    b.infer(crops[: min(len(crops), 512)])
    times = []
    for _ in range(repeats):
        sync()
        t = time.perf_counter()
        b.infer(crops)
        sync()
        times.append(time.perf_counter() - t)
    return len(crops) / statistics.median(times)


def compare(emb: np.ndarray, ref: np.ndarray, n_train: int, codes: np.ndarray, n_classes: int) -> dict:
    """Cosines of ``emb`` to ``ref`` (both: training cells, then held-out cells) and the k-NN of each."""
    from scdino.engine.precision import cosines
    from scdino.knn import knn_predict

    cos = cosines(emb, ref)
    truth = codes[n_train:]
    pred = knn_predict(emb[:n_train], codes[:n_train], emb[n_train:], n_classes=n_classes)
    pred_ref = knn_predict(ref[:n_train], codes[:n_train], ref[n_train:], n_classes=n_classes)
    return {
        "min_cosine": float(cos.min()),
        "p01_cosine": float(np.percentile(cos, 1)),
        "mean_cosine": float(cos.mean()),
        "knn_agreement": float((pred == pred_ref).mean()),
        "knn_top1": float((pred == truth).mean()),
        "knn_top1_fp32": float((pred_ref == truth).mean()),
    }


def settings(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="random:vit_small16")
    ap.add_argument("--input-size", type=int, default=224)
    ap.add_argument("--train-cells", type=int, help="Reference cells, evenly spaced (default: all 2,064).")
    ap.add_argument("--holdout-cells", type=int, help="Query cells, evenly spaced (default: all 516).")
    ap.add_argument("--timing-cells", type=int, default=8192, help="Crops per timed pass (the cells, repeated).")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch", type=int, default=256, help="Crops per forward pass on CUDA.")
    ap.add_argument("--cpu-batch", type=int, default=64, help="Crops per forward pass of the CPU fp32 reference.")
    ap.add_argument("--out", default="benchmarks/results/gpu_precision.json")
    ap.add_argument("--cpu-dry-run", action="store_true", help="ViT-test/16 at 32 px on 96 + 48 cells, on the CPU.")
    args = ap.parse_args(argv)
    if args.cpu_dry_run:
        args.model, args.input_size, args.train_cells, args.holdout_cells, args.timing_cells = (
            "random:vit_test16",
            32,
            96,
            48,
            256,
        )
        if args.out == ap.get_default("out"):
            args.out = "benchmarks/results/gpu_precision_cpu_dry_run.json"
    return args


def main(argv: list[str] | None = None) -> int:
    args = settings(argv)
    problem = unimportable(NEEDED)
    if problem:  # one line; the JSON without the machine (harness.machine imports scdino, which may be what is missing)
        status = "skipped" if problem[1] else "failed"
        why = f"{problem[0]}; the wheels a device machine needs: benchmarks/device/wheels.txt"
        print(f"gpu_precision: {status} ({why})")
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"benchmark": "gpu_precision", "status": status, "why": why}, indent=1))
        return 0 if problem[1] else 1
    import torch

    train, train_y = load("train", args.train_cells)
    held, held_y = load("holdout", args.holdout_cells)
    crops = np.concatenate([train, held])
    classes = sorted(set(train_y) | set(held_y))
    codes = np.array([classes.index(c) for c in [*train_y, *held_y]])
    timing = np.concatenate([crops] * (args.timing_cells // len(crops) + 1))[: args.timing_cells]
    print(
        f"{len(train)} reference + {len(held)} held-out Jurkat cells, {args.model} at {args.input_size} px", flush=True
    )

    b = backend(args.model, args.input_size, "cpu", args.cpu_batch)
    t = time.perf_counter()
    ref = b.infer(crops)
    ref_s = time.perf_counter() - t
    b.close()
    held_to = {"n_train": len(train), "codes": codes, "n_classes": len(classes)}
    rows = [{"path": "cpu fp32 (the reference)", "cells_per_s": len(crops) / ref_s, **compare(ref, ref, **held_to)}]
    skipped: dict[str, str] = {}
    cuda = torch.cuda.is_available()
    for autocast in PRECISIONS:
        name = f"cuda {'fp16' if autocast == 'float16' else 'bf16'} autocast"
        if not cuda:
            skipped[name] = "no CUDA device visible to PyTorch"
            print(f"{name}: skipped ({skipped[name]})", flush=True)
            continue
        if autocast == "bfloat16" and not torch.cuda.is_bf16_supported():
            skipped[name] = "this GPU has no bf16"
            print(f"{name}: skipped ({skipped[name]})", flush=True)
            continue
        b = backend(args.model, args.input_size, "cuda", args.batch, autocast)
        emb = b.infer(crops)
        rate = timed(b, timing, args.repeats, cuda=True)
        b.close()
        rows.append(
            {"path": name, "precision": b.info["precision"], "cells_per_s": rate, **compare(emb, ref, **held_to)}
        )
        print(f"{name}: {rate:.0f} cells/s, min cosine {rows[-1]['min_cosine']:.6f}", flush=True)
    if not cuda:  # the comparison itself, on what a CPU has: fp32 at another batch size against the reference
        other = max(1, args.cpu_batch // 2 - 1)
        b = backend(args.model, args.input_size, "cpu", other)
        emb = b.infer(crops)
        b.close()
        rows.append({"path": f"cpu fp32, batch {other} (in place of CUDA)", **compare(emb, ref, **held_to)})
    print()
    print_table(
        rows,
        [
            ("path", "path", "s"), ("cells/s", "cells_per_s", ".0f"), ("min cosine to fp32", "min_cosine", ".6f"),
            ("1st percentile", "p01_cosine", ".6f"), ("mean", "mean_cosine", ".6f"),
            ("k-NN agreement with fp32", "knn_agreement", ".4f"), ("k-NN top-1", "knn_top1", ".4f"),
        ],
    )  # fmt: skip
    res = {
        "benchmark": "gpu_precision",
        "settings": {
            k: getattr(args, k) for k in ("model", "input_size", "timing_cells", "repeats", "batch", "cpu_batch")
        },
        "cells": {"reference": len(train), "held_out": len(held), "classes": classes},
        "rows": rows,
        "skipped": skipped,
        "machine": machine(gpu=torch.cuda.get_device_name() if cuda else None, cuda=torch.version.cuda),
    }
    print(f"\nwrote {write_results(args.out, res)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
