"""``scdino-engine evaluate``: every model x channel set on a labelled crop store, k-NN top-1 heatmap (the paper's
Fig. 1B/1E/2A), accuracy per training epoch (Fig. 2B), baselines in the same table, one report folder."""

from __future__ import annotations

import json
import logging
import re
import time
from dataclasses import replace
from pathlib import Path
from typing import Sequence

import numpy as np

from scdino.errors import InputError, OutputError

log = logging.getLogger(__name__)


def raw_pixel_features(crops: np.ndarray, scale_lo=None, scale_hi=None) -> np.ndarray:
    """Baseline: each crop min-max scaled per channel (or by a fixed per-channel range), flattened."""
    import torch

    from scdino.preprocess import scale_intensity

    return scale_intensity(torch.from_numpy(crops.astype(np.float32)), scale_lo, scale_hi).flatten(1).numpy()


def fixed_range_of(model: str):
    """(its Preprocessing, its channel names) when ``model`` scales intensities by a fixed per-channel range (trained
    with ``intensity_scaling=dataset``), else None."""
    from scdino.engine.backends import model_format
    from scdino.errors import ConfigError
    from scdino.models import load_model, native_channels
    from scdino.preprocess import Preprocessing

    if model_format(model) != "checkpoint":
        from scdino.export.sidecar import read_sidecar

        meta = read_sidecar(model)
        prep = Preprocessing.from_dict(meta["preprocessing"])
        return (prep, list(meta.get("channels") or [])) if prep.scale_lo is not None else None
    if model.startswith("random:"):
        return None
    try:
        n_channels = native_channels(model)
    except ConfigError:  # an RGB model adapted to any channel count: it has no fixed range of its own
        return None
    lm = load_model(model, n_channels)
    return (lm.prep, list(lm.channels or [])) if lm.prep.scale_lo is not None else None


def _checkpoints(run_dir: str) -> list[tuple[int, str]]:
    found = []
    for p in Path(run_dir).glob("checkpoint*.pth"):
        m = re.fullmatch(r"checkpoint(\d+)\.pth", p.name)
        if m:
            found.append((int(m.group(1)), str(p)))
    if not found:
        raise InputError(f"{run_dir}: no checkpointNNNN.pth files; pass the RUN_DIR of scdino-train")
    return sorted(found)


def evaluate(
    crops: str,
    models: Sequence[str],
    channel_sets: Sequence[Sequence[str]],
    out: str,
    label_key: str = "class",
    k: int = 20,
    temperature: float = 0.07,
    train_fraction: float = 0.8,
    seed: int = 0,
    input_size: int | None = None,
    batch_size: int = 64,
    run_dir: str | None = None,
    baseline_arch: str | None = None,
    progress: bool = True,
) -> dict:
    """Run the grid and write ``out``/report.md, results.json, heatmap.png (and epochs.png)."""
    from distributed import Client, LocalCluster

    from scdino.engine.cells import CellOptions
    from scdino.engine.ingest import CropStore, is_crop_store
    from scdino.engine.knn import evaluate_knn, labels_of, read_embeddings
    from scdino.engine.pipeline import RunConfig, run
    from scdino.engine.plots import epochs_png, heatmap_png
    from scdino.models import embed_crops, load_model
    from scdino.plate import resolve_channels

    if not is_crop_store(crops):
        raise InputError(f"{crops}: evaluate needs a labelled crop store; make one with 'scdino-engine ingest'")
    store = CropStore(crops)
    table = store.table()
    labels = labels_of(table, label_key, crops)
    if labels.isna().any():
        raise InputError(f"{crops}: {int(labels.isna().sum())} cells have no {label_key!r}")
    y = labels.to_numpy()
    outdir = Path(out)
    (outdir / "embeddings").mkdir(parents=True, exist_ok=True)
    sets = [tuple(s) for s in channel_sets] or [tuple(store.channels)]
    for s in sets:
        resolve_channels(store.channels, s, crops)  # unknown channel names fail before any work
    untrained = f"random:{baseline_arch}" if baseline_arch else "random:vit_small16"
    columns = list(models) + [f"untrained {untrained.split(':')[1]}", "raw pixels"]
    # a model trained with a fixed intensity range is held to baselines that keep absolute levels too: per-crop min-max
    # baselines alone would credit training with what the scaling gives (README, "Keeping marker levels")
    fixed = None
    for m in [*models, *([str(_checkpoints(run_dir)[-1][1])] if run_dir else [])]:
        fixed = fixed or fixed_range_of(m)
    if fixed:
        columns += [f"untrained {untrained.split(':')[1]}, fixed range", "raw pixels, fixed range"]
    acc = np.full((len(sets), len(columns)), np.nan)
    details: dict = {}
    t0 = time.perf_counter()

    def knn(x: np.ndarray) -> dict:
        return evaluate_knn(x, y, k, temperature, train_fraction, seed)

    with (
        LocalCluster(
            n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None, silence_logs=logging.WARNING
        ) as cluster,
        Client(cluster),
    ):

        def embed(model: str, chans: tuple[str, ...], tag: str) -> np.ndarray:
            path = outdir / "embeddings" / f"{tag}.zarr"
            rc = RunConfig(
                plate=crops,
                out=str(path),
                model=model,
                cells=CellOptions(channels=chans),
                input_size=input_size,
                batch_size=batch_size,
                progress=progress,
            )
            try:  # a finished or interrupted grid cell of an earlier evaluate is reused or resumed
                run(rc)
            except OutputError:  # left by a grid with other settings: this report folder owns it
                run(replace(rc, overwrite=True))
            return read_embeddings(str(path))[0]

        for i, chans in enumerate(sets):
            name = "+".join(chans)
            for j, model in enumerate([*models, untrained]):
                tag = f"{j}_{re.sub(r'[^A-Za-z0-9]+', '_', Path(model).stem if '/' in model else model)}_{name}"
                r = knn(embed(model, chans, re.sub(r"[^A-Za-z0-9_+-]", "_", tag)))
                acc[i, j] = r["top1"]
                details[f"{columns[j]} | {name}"] = r
            idx = resolve_channels(store.channels, chans, crops)
            raw = store.read(np.arange(len(table)), idx)
            r = knn(raw_pixel_features(raw))
            j = len(models) + 1
            acc[i, j] = r["top1"]
            details[f"raw pixels | {name}"] = r
            if fixed and all(c in fixed[1] for c in chans):  # the range is known for these channels (by name)
                prep = fixed[0].select([fixed[1].index(c) for c in chans])
                net = load_model(untrained, len(chans), prep.input_size).model
                for jj, feats in (
                    (j + 1, embed_crops(net, raw, prep)),
                    (j + 2, raw_pixel_features(raw, prep.scale_lo, prep.scale_hi)),
                ):
                    r = knn(feats)
                    acc[i, jj] = r["top1"]
                    details[f"{columns[jj]} | {name}"] = r
        epochs = []
        if run_dir:
            chans = sets[-1]
            for ep, ck in _checkpoints(run_dir):
                epochs.append((ep, knn(embed(ck, chans, f"epoch{ep:04d}"))["top1"]))
    rows = ["+".join(s) for s in sets]
    heatmap_png(
        acc,
        rows,
        columns,
        str(outdir / "heatmap.png"),
        f"k-NN top-1 (k={k}, T={temperature}, {int(100 * train_fraction)}/{100 - int(100 * train_fraction)} "
        f"split, seed {seed})",
    )
    result = {
        "crops": crops,
        "label_key": label_key,
        "classes": sorted(set(map(str, y))),
        "n_cells": len(y),
        "rows": rows,
        "columns": columns,
        "top1": [[float(v) if np.isfinite(v) else None for v in row] for row in acc],
        "details": details,
        "k": k,
        "temperature": temperature,
        "seed": seed,
        "input_size": input_size,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    if epochs:
        j = len(models) + 1
        if fixed and np.isfinite(acc[-1, j + 2]):
            base = {"untrained, fixed range": float(acc[-1, j + 1]), "raw pixels, fixed range": float(acc[-1, j + 2])}
        else:
            base = {"untrained": float(acc[-1, j - 1]), "raw pixels": float(acc[-1, j])}
        epochs_png(
            [e for e, _ in epochs],
            [a for _, a in epochs],
            str(outdir / "epochs.png"),
            base,
            f"k-NN top-1 per epoch ({rows[-1]})",
        )
        result["epochs"] = [{"epoch": e, "top1": a} for e, a in epochs]
    (outdir / "results.json").write_text(json.dumps(result, indent=2))
    md = [
        f"# scdino evaluation of {crops}",
        "",
        f"{len(y)} cells, classes {', '.join(result['classes'])}; k-NN k={k}, T={temperature}, "
        f"{int(100 * train_fraction)}% reference / rest query, seed {seed}; input {input_size} px.",
        "",
        "| channels | " + " | ".join(columns) + " |",
        "|---" * (len(columns) + 1) + "|",
    ]
    for i, r in enumerate(rows):
        md.append(f"| {r} | " + " | ".join(f"{100 * v:.1f}" if np.isfinite(v) else "-" for v in acc[i]) + " |")
    md += ["", "![k-NN heatmap](heatmap.png)"]
    if epochs:
        md += [
            "",
            "| epoch | top-1 |",
            "|---|---|",
            *[f"| {e} | {100 * a:.1f} |" for e, a in epochs],
            "",
            "![per epoch](epochs.png)",
        ]
    (outdir / "report.md").write_text("\n".join(md) + "\n")
    return result
