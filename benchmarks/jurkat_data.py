"""Build the Jurkat cell-cycle crop stores shipped in ``benchmarks/data/jurkat_cellcycle/`` from the published folder
layout (``CLASS/NAME.tif``, 40 x 40 px, channels last BF, DNA, DF).

The cells are split once, stratified by class with a fixed seed, into ``train.zarr`` (80%: what ``scdino-train`` sees)
and ``holdout.zarr`` (20%: only ever embedded, for the comparison in ``benchmarks/jurkat_cellcycle.py``). Each store is
written by ``scdino-engine ingest`` itself, from a folder of links to the chosen files, so its ``path`` column names
the source file of every row.

    python benchmarks/jurkat_data.py FOLDER [--out benchmarks/data/jurkat_cellcycle]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

import numpy as np

from scdino.engine.ingest import EXTS, ingest
from scdino.knn import split

CHANNELS = ("BF", "DNA", "DF")
SEED = 0  # the split's seed: fixed once, never tuned
HOLDOUT = 0.2


def files_of(folder: Path) -> list[tuple[str, Path]]:
    classes = sorted(d.name for d in folder.iterdir() if d.is_dir())
    return [(c, p) for c in classes for p in sorted((folder / c).iterdir()) if p.suffix.lower() in EXTS]


def _linked(files: list[tuple[str, Path]], tmp: Path) -> Path:
    for c, p in files:
        (tmp / c).mkdir(parents=True, exist_ok=True)
        os.symlink(p.resolve(), tmp / c / p.name)
    return tmp


def _name_source(store: Path, name: str) -> None:
    """The store's ``source`` attribute names the data set, not the temporary folder of links it was read from."""
    import zarr

    from scdino.cells.cropstore import ATTR

    g = zarr.open_group(str(store), mode="r+", use_consolidated=False)
    g.attrs[ATTR] = {**dict(g.attrs[ATTR]), "source": f"{name} (Blasi et al. 2016; see README.md beside this store)"}


def build(folder: Path, out: Path, overwrite: bool = False) -> dict:
    files = files_of(folder)
    labels = np.array([c for c, _ in files])
    train, held, _ = split(labels, 1 - HOLDOUT, SEED)
    out.mkdir(parents=True, exist_ok=True)
    summary = {"source": folder.name, "seed": SEED, "holdout_fraction": HOLDOUT, "stores": {}}
    for name, rows in (("train", train), ("holdout", held)):
        with tempfile.TemporaryDirectory() as tmp:
            src = _linked([files[i] for i in rows], Path(tmp) / folder.name)
            ingest(src, out / f"{name}.zarr", channels=CHANNELS, overwrite=overwrite, progress=False)
        _name_source(out / f"{name}.zarr", folder.name)
        classes, counts = np.unique(labels[rows], return_counts=True)
        summary["stores"][name] = {"cells": len(rows), "per_class": dict(zip(classes.tolist(), counts.tolist()))}
    (out / "split.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder", type=Path, help="the published layout: one sub-folder of TIFFs per class")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "data" / "jurkat_cellcycle")
    ap.add_argument("--overwrite", action="store_true", help="replace stores this script wrote before")
    args = ap.parse_args()
    print(json.dumps(build(args.folder, args.out, args.overwrite), indent=1))


if __name__ == "__main__":
    main()
