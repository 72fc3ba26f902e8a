"""k-NN of the shipped default model against both baselines on cells it never saw.

The default model was trained on well A/2 of the neocortex sample plate (README, "The default model"). Here the cells
of well A/1 are embedded by (a) the default model, (b) the same architecture untrained, and (c) raw pixels (min-max
scaled per channel, flattened; for a model trained with a fixed per-channel intensity range, also raw pixels scaled by
that range). The label is the dominant nuclear marker of each nucleus (CTIP2, BRN2 or ROR: the
channel brightest at the crop centre relative to its spread over all crops), derived from the pixels and never used in
training. k-NN as in the paper (k=20, T=0.07, 80/20 stratified split), over 20 split seeds: mean and sd, and the paired
difference to each baseline on the same splits.

    python benchmarks/default_model_knn.py [--model default] [--wells A/1]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
from harness import write_results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default")
    ap.add_argument("--wells", default="A/1")
    ap.add_argument("--seeds", type=int, default=20)
    ap.add_argument("--out", default="benchmarks/results/default_model_knn.json")
    args = ap.parse_args()
    import anndata as ad

    from scdino.cells.options import CellOptions
    from scdino.cells.plate import Plate
    from scdino.cells.table import read_crops
    from scdino.engine.evaluate import raw_pixel_features
    from scdino.engine.pipeline import RunConfig, run
    from scdino.engine.sample import neocortex_segment_params, write_sample_plate
    from scdino.knn import dominant_channel_labels, evaluate_knn
    from scdino.models import embed_crops, load_model

    tmp = Path(tempfile.mkdtemp(prefix="scdino-default-"))
    plate = write_sample_plate(tmp / "neocortex.zarr", "neocortex")
    lm = load_model(args.model, 3)
    arch, size = lm.info["arch"], lm.prep.input_size
    crop = int(lm.info.get("crop_size") or 32)
    cells = CellOptions(
        segment_channel="CTIP2,BRN2,ROR",
        crop_size=crop,
        wells=tuple(args.wells.split(",")),
        segment=neocortex_segment_params(),
    )
    feats = {}
    for name, model in ((f"trained ({args.model})", args.model), (f"untrained {arch}", f"random:{arch}")):
        out = tmp / f"{len(feats)}.zarr"
        run(RunConfig(plate=plate, out=str(out), model=model, cells=cells, input_size=size, progress=False))
        a = ad.read_zarr(out)
        feats[name] = a.obsm["X_scdino"]
        table = a.obs.reset_index(drop=True)
    crops = read_crops(Plate(plate), table, [0, 1, 2], crop)
    feats["raw pixels"] = raw_pixel_features(crops)
    if lm.prep.scale_lo is not None:  # the model keeps absolute levels: so must the pixel baseline it is held to
        feats["raw pixels, the model's fixed intensity range"] = raw_pixel_features(
            crops, lm.prep.scale_lo, lm.prep.scale_hi
        )
        untrained = load_model(f"random:{arch}", 3, size).model
        feats[f"untrained {arch}, the model's preprocessing"] = embed_crops(untrained, crops, lm.prep)
    labels = np.array(["CTIP2", "BRN2", "ROR"])[dominant_channel_labels(crops)]
    rows = []
    for name, x in feats.items():
        acc = [evaluate_knn(x, labels, seed=s) for s in range(args.seeds)]
        top1 = [r["top1"] for r in acc]
        bal = [r["balanced_accuracy"] for r in acc]
        rows.append(
            {
                "features": name,
                "top1_mean": float(np.mean(top1)),
                "top1_sd": float(np.std(top1)),
                "balanced_mean": float(np.mean(bal)),
                "top1": top1,
            }
        )
    print(
        f"\n{len(labels)} cells of {args.wells} (classes {dict(zip(*np.unique(labels, return_counts=True)))}), "
        f"{arch} at {size} px, k=20, T=0.07, 80/20 split x {args.seeds} seeds\n"
    )
    print("| features | k-NN top-1 (mean +- sd) | balanced accuracy | trained minus this, same splits (trained wins) |")
    print("|---|---|---|---|")
    t0 = np.array(rows[0]["top1"])
    for r in rows:
        d = t0 - np.array(r["top1"])
        r["paired_diff_mean"], r["trained_wins"], r["ties"] = float(d.mean()), int((d > 0).sum()), int((d == 0).sum())
        paired = "" if r is rows[0] else f"{100 * d.mean():+.1f} ({r['trained_wins']}/{len(d)}, ties {r['ties']})"
        print(
            f"| {r['features']} | {100 * r['top1_mean']:.1f} +- {100 * r['top1_sd']:.1f} | "
            f"{100 * r['balanced_mean']:.1f} | {paired} |"
        )
    res = {
        "benchmark": "default_model_knn",
        "model": args.model,
        "model_info": lm.info,
        "wells": args.wells,
        "n_cells": int(len(labels)),
        "results": rows,
    }
    write_results(args.out, res)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
