"""The shipped default model against its untrained twin and raw pixels, with intervals, on cells it never saw.

The default model was trained on well A/2 of the neocortex sample plate (docs/training.md, "The default model"). Here
the cells of well A/1 are embedded through ``scdino-engine run`` by (a) the default model and (b) the same
architecture untrained, each without and with test-time augmentation (``--tta d8``: the mean over the 8 flips and
quarter turns of each crop), beside (c) raw pixels (min-max scaled per channel, flattened; for a model trained with
a fixed per-channel intensity range, also raw pixels scaled by that range). The label is the dominant nuclear marker
of each nucleus (CTIP2, BRN2 or ROR: the channel brightest at the crop centre relative to its spread over all crops),
derived from the pixels and never used in training.

Accuracy by :func:`scdino.crossval.cross_validate`: 5-fold stratified cross-validation over every cell of the well,
weighted k-NN (k=20, T=0.07) and a linear probe, 95% bootstrap intervals, and paired differences on the same cells
(the model against each baseline, with and without augmentation; augmentation against none) called a win only when
the interval excludes 0.

    python benchmarks/default_model_knn.py [--model default] [--wells A/1] [--out results/default_model_knn.json]
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
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--bootstrap", type=int, default=2000)
    ap.add_argument("--tta", default="d8", help="the augmentation compared with none")
    ap.add_argument("--out", default="benchmarks/results/default_model_knn.json")
    args = ap.parse_args()
    import anndata as ad

    from scdino.cells.options import CellOptions
    from scdino.cells.plate import Plate
    from scdino.cells.table import read_crops
    from scdino.crossval import cross_validate, report_lines
    from scdino.engine.evaluate import raw_pixel_features
    from scdino.engine.pipeline import RunConfig, run
    from scdino.engine.sample import neocortex_segment_params, write_sample_plate
    from scdino.knn import dominant_channel_labels
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
    feats, tta = {}, args.tta
    trained, untrained = f"default model ({args.model})", f"untrained {arch}"
    for name, model in ((trained, args.model), (untrained, f"random:{arch}")):
        for mode in ("none", tta):
            out = tmp / f"{len(feats)}.zarr"
            run(RunConfig(plate, str(out), model, cells, input_size=size, progress=False, tta=mode))
            a = ad.read_zarr(out)
            feats[f"{name}, tta {mode}"] = a.obsm["X_scdino"]
            table = a.obs.reset_index(drop=True)
    crops = read_crops(Plate(plate), table, [0, 1, 2], crop)
    feats["raw pixels"] = raw_pixel_features(crops)
    if lm.prep.scale_lo is not None:  # the model keeps absolute levels: so must the pixel baseline it is held to
        feats["raw pixels, the model's fixed intensity range"] = raw_pixel_features(
            crops, lm.prep.scale_lo, lm.prep.scale_hi
        )
        net = load_model(f"random:{arch}", 3, size).model
        feats[f"{untrained}, the model's preprocessing"] = embed_crops(net, crops, lm.prep)
    labels = np.array(["CTIP2", "BRN2", "ROR"])[dominant_channel_labels(crops)]
    pairs = [(f"{trained}, tta {m}", b) for m in ("none", tta) for b in (f"{untrained}, tta {m}", "raw pixels")]
    pairs += [(f"{n}, tta {tta}", f"{n}, tta none") for n in (trained, untrained)]
    pairs += [(f"{trained}, tta none", b) for b in feats if b.endswith("preprocessing") or b.endswith("range")]
    cv = cross_validate(feats, labels, folds=args.folds, n_boot=args.bootstrap, pairs=pairs)
    cv.pop("predictions")
    print(f"\n{len(labels)} cells of {args.wells} (classes {cv['class_counts']}), {arch} at {size} px\n")
    print("\n".join(report_lines(cv)))
    res = {
        "benchmark": "default_model_knn",
        "model": args.model,
        "model_info": lm.info,
        "wells": args.wells,
        "n_cells": int(len(labels)),
        "cv": cv,
    }
    write_results(args.out, res)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
