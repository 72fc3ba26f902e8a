"""``scdino-engine umap``: UMAP of the CLS tokens with the paper's presets; cuML on a GPU, umap-learn on the CPU.

For large stores the embedding is fitted on a seeded subsample of ``fit_max`` cells and the rest is transformed
with that fit (recorded in ``uns["umap"]`` and in the figure title).
"""

from __future__ import annotations

import json
import logging
import os
import time
import warnings
from pathlib import Path

import numpy as np

from scdino._optional import pip_extra
from scdino.bounds import Bound, check, declare
from scdino.errors import ConfigError
from scdino.progress import Progress, heartbeat

log = logging.getLogger(__name__)

declare(
    n_neighbors=Bound("UMAP neighbours", low=2, integer=True),
    min_dist=Bound("UMAP least distance between embedded points", low=0),
    spread=Bound("UMAP spread", low=0, low_open=True),
    epochs=Bound("UMAP optimisation epochs", low=1, integer=True),
    fit_max=Bound("cells UMAP is fitted on", low=3, integer=True),
)


def check_umap(n_neighbors: int | None, min_dist: float | None, spread: float | None, n_epochs: int | None) -> None:
    """UMAP's settings: each in its bounds, and min_dist no larger than spread (umap-learn's rule)."""
    check(n_neighbors=n_neighbors, min_dist=min_dist, spread=spread, epochs=n_epochs)
    if min_dist is not None and spread is not None and min_dist > spread:
        raise ConfigError(f"--min-dist {min_dist} is above --spread {spread}; UMAP needs min_dist <= spread")

#: SPEC section 4
PRESETS = {
    "ipsc-qc": {"metric": "euclidean", "n_neighbors": 30, "min_dist": 0.4, "spread": 1.1, "n_epochs": 500},
    "ipsc-morphology": {"metric": "euclidean", "n_neighbors": 20, "min_dist": 0.1, "spread": 1.0, "n_epochs": 500},
    "immune": {"metric": "euclidean", "n_neighbors": 50, "min_dist": 0.3, "spread": 1.0, "n_epochs": 500},
}
DEFAULT_PRESET = "ipsc-qc"
#: UMAP is fitted on at most this many cells (a seeded subsample); the rest are transformed with that fit
FIT_MAX = 200_000


def _cuml_usable() -> bool:
    try:
        import torch

        if not torch.cuda.is_available():
            return False
        import cuml  # noqa: F401
    except Exception:  # cuML's import can fail in many ways without a working CUDA stack
        return False
    return True


def fit_umap(x: np.ndarray, params: dict, device: str = "auto", fit_max: int = FIT_MAX, seed: int = 0) -> tuple:
    """2-D embedding of ``x``; returns (coordinates, info)."""
    use_gpu = device == "cuda" or (device == "auto" and _cuml_usable())
    if device == "cuda" and not _cuml_usable():
        raise ConfigError(f"--device cuda for UMAP needs cuML and a GPU: {pip_extra('gpu')}, plus cuml-cu13 (CUDA 13)")
    n = len(x)
    rng = np.random.default_rng(seed)
    fit_idx = np.sort(rng.choice(n, fit_max, replace=False)) if n > fit_max else np.arange(n)
    nn = min(params["n_neighbors"], max(2, len(fit_idx) - 1))
    kw = dict(
        n_neighbors=nn,
        min_dist=params["min_dist"],
        spread=params["spread"],
        n_epochs=params["n_epochs"],
        metric=params["metric"],
        n_components=2,
        random_state=seed,
    )
    t = time.perf_counter()
    if use_gpu:
        from cuml.manifold import UMAP
    else:
        from umap import UMAP
    reducer = UMAP(**kw)
    out = np.empty((n, 2), np.float32)
    with (
        warnings.catch_warnings(),
        heartbeat(f"UMAP fit of {len(fit_idx)} cells ({'cuML' if use_gpu else 'umap-learn'})"),
    ):
        # umap-learn says that a seed means one thread; the seed is the point (reproducible figures)
        warnings.filterwarnings("ignore", message=".*n_jobs value.*overridden.*")
        out[fit_idx] = reducer.fit_transform(x[fit_idx])
    if len(fit_idx) < n:
        rest = np.setdiff1d(np.arange(n), fit_idx)
        with Progress(len(rest), "UMAP transform", "cell") as bar:
            for a in range(0, len(rest), 100_000):
                out[rest[a : a + 100_000]] = reducer.transform(x[rest[a : a + 100_000]])
                bar.update(len(rest[a : a + 100_000]))
    info = {
        **params,
        "n_neighbors": nn,
        "engine": "cuml" if use_gpu else "umap-learn",
        "seed": seed,
        "fitted_on": int(len(fit_idx)),
        "transformed": int(n - len(fit_idx)),
        "seconds": round(time.perf_counter() - t, 2),
    }
    return out, info


def umap_command(
    cells: str,
    preset: str | None = DEFAULT_PRESET,
    overrides: dict | None = None,
    color_by: str | None = None,
    device: str = "auto",
    fit_max: int = FIT_MAX,
    seed: int = 0,
    png: str | None = None,
) -> dict:
    import zarr

    from scdino.engine.output import consolidate, quiet_zarr, read_embeddings
    from scdino.engine.plots import is_scdino_png, scatter_png
    from scdino.outputs import check_writable, claim_file

    if preset is not None and preset not in PRESETS:
        raise ConfigError(f"--preset {preset!r}: expected one of {', '.join(PRESETS)}")
    params = {**PRESETS[preset or DEFAULT_PRESET], **{k: v for k, v in (overrides or {}).items() if v is not None}}
    check_umap(params["n_neighbors"], params["min_dist"], params["spread"], params["n_epochs"])
    check(fit_max=fit_max, seed=seed)
    x, obs = read_embeddings(cells)
    png = png or os.path.join(os.path.dirname(os.path.abspath(cells)), Path(cells).stem + "_umap.png")
    claim_file(png, inputs=[cells], option="--png", ours=is_scdino_png)
    # the fit takes minutes on a large store: where its results go is checked first
    check_writable(
        os.path.join(cells, "obsm"),
        fix="umap writes obsm['X_umap'] into the store CELLS: copy the store to a writable location",
    )
    color_by = color_by or next((c for c in ("class", "well") if c in obs), None)
    if color_by is not None and color_by not in obs:
        raise ConfigError(f"{cells}: no obs column {color_by!r} to colour by; columns are {', '.join(obs.columns)}")
    xy, info = fit_umap(x, params, device, fit_max, seed)
    info["preset"] = preset
    g = zarr.open_group(cells, mode="r+", use_consolidated=False)
    if "X_umap" in g["obsm"]:
        del g["obsm"]["X_umap"]
    arr = g["obsm"].create_array("X_umap", shape=xy.shape, dtype="float32", chunks=(min(len(xy), 65536), 2))
    arr[...] = xy
    arr.attrs.update({"encoding-type": "array", "encoding-version": "0.2.0"})
    from anndata.io import write_elem

    with quiet_zarr():
        write_elem(g["uns"], "umap", json.loads(json.dumps(info)))
    consolidate(cells)
    sub = f", fitted on {info['fitted_on']} of {len(xy)} cells" if info["transformed"] else ""
    labels = obs[color_by].astype(str).to_numpy() if color_by else np.zeros(len(xy), int)
    scatter_png(xy, labels, png, f"{Path(cells).name}: UMAP ({preset}, {info['engine']}{sub}), colour: {color_by}")
    return {**info, "png": png, "n": int(len(xy))}
