"""Accuracy with intervals and cost of test-time augmentation on all 2,580 real Jurkat cells
(``benchmarks/data/jurkat_cellcycle``, both stores together).

Every network embeds the cells through ``scdino-engine run`` itself, once per ``--tta`` mode (none, the 4 axis flips,
all 8 flips and quarter turns); the embedding time of each mode is measured side by side in this run. Beside them:
raw pixels (each crop min-max scaled per channel, flattened). Accuracy by :func:`scdino.crossval.cross_validate`:
5-fold stratified cross-validation over every cell, weighted k-NN (k=20, T=0.07) and a linear probe (logistic
regression on standardised features), 95% intervals from a bootstrap of the cells within each class, and paired
differences (each augmentation against none, each network against raw pixels, a trained model against its untrained
twin) called a win only when the interval excludes 0.

Networks: the untrained ViT-tiny/8 at 40 px (random weights, seed 0) and, with ``--model``, a scdino-train checkpoint
with its untrained twin (the same file, weights replaced by a seeded untrained network).

    python benchmarks/jurkat_cv.py [--channels BF,DF] [--model CKPT] [--merge-classes Anaphase,Telophase=late_M]
        [--out benchmarks/results/jurkat_cv.json]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
from harness import print_table, write_results
from jurkat_cellcycle import DATA, INPUT_SIZE, UNTRAINED, _untrained_twin

MODES = ("none", "flips", "d8")


def embed(model: str, channels: tuple[str, ...], tta: str, work: Path) -> tuple[np.ndarray, float, int]:
    """(embeddings of the training then the held-out cells, embedding seconds, cells) through the engine's run."""
    from scdino.cells.options import CellOptions
    from scdino.engine.output import read_embeddings
    from scdino.engine.pipeline import RunConfig, run

    parts, seconds, n = [], 0.0, 0
    for store in ("train", "holdout"):
        out = work / f"{len(list(work.iterdir()))}.zarr"
        cfg = RunConfig(
            plate=str(DATA / f"{store}.zarr"),
            out=str(out),
            model=model,
            cells=CellOptions(channels=channels),
            input_size=INPUT_SIZE,
            progress=False,
            tta=tta,
        )
        res = run(cfg)
        seconds += res.phase_seconds["embed_seconds"]
        n += res.n_cells
        parts.append(read_embeddings(str(out))[0])
    return np.concatenate(parts), seconds, n


def load(channels: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Crops (train then held-out) of ``channels`` and their classes."""
    from scdino.cells.cropstore import CropStore

    crops, labels = [], []
    for store in ("train", "holdout"):
        s = CropStore(DATA / f"{store}.zarr")
        crops.append(s.read(np.arange(len(s.table())), [s.channels.index(c) for c in channels]))
        labels.append(s.table()["class"].astype(str).to_numpy())
    return np.concatenate(crops), np.concatenate(labels)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--channels", default="BF,DF")
    ap.add_argument("--model", help="a scdino-train checkpoint trained on --channels")
    ap.add_argument("--merge-classes")
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--bootstrap", type=int, default=2000)
    ap.add_argument("--tta", default=",".join(MODES), help="the --tta modes to compare")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "jurkat_cv.json"))
    args = ap.parse_args()
    from scdino.crossval import cross_validate, parse_merge, report_lines
    from scdino.engine.evaluate import raw_pixel_features

    channels = tuple(args.channels.split(","))
    modes = tuple(args.tta.split(","))
    work = Path(tempfile.mkdtemp(prefix="scdino-jurkat-cv-"))
    crops, labels = load(channels)
    nets = {"untrained ViT-tiny/8": UNTRAINED}
    if args.model:
        nets = {"trained model": args.model}
        twin = _untrained_twin(args.model, work)
        nets["untrained twin" if twin else "untrained ViT-tiny/8"] = twin or UNTRAINED
    features, cost = {}, []
    for name, model in nets.items():
        for mode in modes:
            x, seconds, n = embed(model, channels, mode, work)
            features[f"{name}, tta {mode}"] = x
            cost.append({"network": name, "tta": mode, "cells": n, "seconds": seconds, "cells_per_s": n / seconds})
    for row in cost:
        base = next(r for r in cost if r["network"] == row["network"] and r["tta"] == modes[0])
        row["time_ratio"] = row["seconds"] / base["seconds"]
    features["raw pixels"] = raw_pixel_features(crops)
    pairs = []
    for name in nets:
        pairs += [(f"{name}, tta {m}", f"{name}, tta {modes[0]}") for m in modes[1:]]
        pairs += [(f"{name}, tta {m}", "raw pixels") for m in modes]
    if args.model:
        pairs += [(f"trained model, tta {m}", f"{list(nets)[1]}, tta {m}") for m in modes]
    t0 = time.perf_counter()
    cv = cross_validate(
        features, labels, folds=args.folds, n_boot=args.bootstrap, merge=parse_merge(args.merge_classes), pairs=pairs
    )
    cv_seconds = time.perf_counter() - t0
    cv.pop("predictions")
    print(f"\n{len(labels)} Jurkat cells, channels {'+'.join(channels)}, input {INPUT_SIZE} px\n")
    print("\n".join(report_lines(cv)))
    print("\nCost of the augmentation: embedding time of both stores through run, measured side by side\n")
    print_table(
        cost,
        [
            ("network", "network", "s"),
            ("tta", "tta", "s"),
            ("cells", "cells", "d"),
            ("seconds", "seconds", ".1f"),
            ("cells/s", "cells_per_s", ".1f"),
            ("time vs none", "time_ratio", ".2f"),
        ],
    )
    res = {
        "benchmark": "jurkat_cv",
        "channels": list(channels),
        "input_size": INPUT_SIZE,
        "models": nets,
        "cost": cost,
        "cv": cv,
        "cv_seconds": cv_seconds,
    }
    write_results(args.out, res)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
