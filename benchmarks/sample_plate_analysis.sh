#!/usr/bin/env bash
# The analysis commands end to end on the real neocortex sample plate with the default model:
# run -> a label derived from the pixels (each nucleus' dominant marker) -> knn, umap, attention.
#   bash benchmarks/sample_plate_analysis.sh [WORKDIR]
set -euo pipefail
work=${1:-$(mktemp -d)}
cd "$work"
scdino-engine sample-plate neocortex.zarr --overwrite
scdino-engine run neocortex.zarr --out cells.zarr --overwrite --segment-channel CTIP2,BRN2,ROR --sigma 1 \
  --min-distance 4 --min-area 15 --crop-size 32
python - <<'PY'
import numpy as np
import pandas as pd
import anndata as ad

from scdino.cells.table import read_crops
from scdino.engine.output import write_obs_column
from scdino.knn import dominant_channel_labels
from scdino.cells.plate import Plate

a = ad.read_zarr("cells.zarr")
crops = read_crops(Plate("neocortex.zarr"), a.obs.reset_index(drop=True), [0, 1, 2], 32)
marker = np.array(["CTIP2", "BRN2", "ROR"])[dominant_channel_labels(crops)]
write_obs_column("cells.zarr", "marker", pd.Categorical(marker))
print("marker counts:", pd.Series(marker).value_counts().to_dict())
PY
scdino-engine knn cells.zarr --label-key marker
scdino-engine umap cells.zarr --preset ipsc-morphology --color-by marker
scdino-engine attention cells.zarr --model default --per-class 3 --label-key marker --out attention
echo "figures in $work: cells_knn/confusion.png cells_umap.png attention/attention.png"
