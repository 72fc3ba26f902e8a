"""A labelled crop store of sample-plate nuclei, labelled by their dominant nuclear marker (for k-NN monitoring).

Cuts the nuclei of the given wells of the neocortex sample plate exactly as ``scdino-engine run`` /
``scdino-train`` do, labels each by its dominant marker (``scdino.knn.dominant_channel_labels``; derived from the
pixels, never used for training), writes them as ``FOLDER/<marker>/<n>.tif`` and ingests that into a crop store,
usable as ``scdino-train --set val_data=STORE --set knn_freq=N``.

    python benchmarks/dominant_label_store.py --wells A/2 --out runs/val_A2.zarr
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--wells", default="A/2")
    ap.add_argument("--crop-size", type=int, default=32)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    import tifffile

    from scdino.cells.options import CellOptions
    from scdino.engine.ingest import ingest
    from scdino.engine.sample import neocortex_segment_params, write_sample_plate
    from scdino.knn import dominant_channel_labels
    from scdino.training.data import load_crops

    tmp = Path(tempfile.mkdtemp(prefix="scdino-labels-"))
    plate = write_sample_plate(tmp / "neocortex.zarr", "neocortex")
    opts = CellOptions(
        segment_channel="CTIP2,BRN2,ROR",
        crop_size=args.crop_size,
        segment=neocortex_segment_params(),
        wells=tuple(args.wells.split(",")),
    )
    crops, names, _ = load_crops(plate, opts)
    crops = crops.numpy().astype(np.uint16)
    labels = np.array(names)[dominant_channel_labels(crops)]
    for i, (c, lab) in enumerate(zip(crops, labels)):
        (tmp / "cells" / lab).mkdir(parents=True, exist_ok=True)
        tifffile.imwrite(tmp / "cells" / lab / f"{i:05d}.tif", c)
    meta = ingest(tmp / "cells", args.out, channels=names, channels_last=False, overwrite=True, progress=False)
    counts = {str(k): int(v) for k, v in zip(*np.unique(labels, return_counts=True))}
    print(f"{meta['n']} crops of {args.wells} -> {args.out}; classes {counts}")


if __name__ == "__main__":
    main()
