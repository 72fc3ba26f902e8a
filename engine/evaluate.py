"""``scdino-engine evaluate``: every model x channel set on a labelled crop store, k-NN top-1 heatmap (the paper's
Fig. 1B/1E/2A), accuracy per training epoch (Fig. 2B), baselines in the same table, one report folder.

:func:`evaluate` = :func:`compute_grid` (embeddings through the engine's own ``run``, k-NN of each) +
:func:`write_report` (results.json, report.md, heatmap.png, epochs.png).
"""

from __future__ import annotations

import json
import logging
import re
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Sequence

import numpy as np
import zarr

from scdino.bounds import check
from scdino.cells.options import CellOptions
from scdino.crossval import BOOTSTRAP, FOLDS, parse_merge
from scdino.engine.tta import averaged, transforms
from scdino.errors import ConfigError, InputError, OutputError
from scdino.knn import TEMPERATURE, TRAIN_FRACTION, K
from scdino.outputs import claimed_dir
from scdino.preprocess import Preprocessing
from scdino.progress import Progress

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvalSettings:
    """The k-NN protocol (SPEC section 4) and how embeddings are made."""

    label_key: str = "class"
    k: int = K
    temperature: float = TEMPERATURE
    train_fraction: float = TRAIN_FRACTION
    seed: int = 0
    input_size: int | None = None
    batch_size: int | None = None  # None: the run's default for the device
    progress: bool = True
    #: stratified K-fold cross-validation over all labelled cells (k-NN and linear probe, with intervals); 0: none
    folds: int = FOLDS
    bootstrap: int = BOOTSTRAP
    #: classes merged before any scoring, e.g. "Anaphase,Telophase=late_mitosis" (:func:`scdino.crossval.parse_merge`)
    merge_classes: str | None = None
    #: test-time augmentation of every network's embeddings (``run --tta``; :mod:`scdino.engine.tta`)
    tta: str = "none"

    def validate(self) -> None:
        """Refuse numbers out of their bounds (:mod:`scdino.bounds`)."""
        check(
            k=self.k,
            temperature=self.temperature,
            train_fraction=self.train_fraction,
            seed=self.seed,
            input_size=self.input_size,
            batch_size=self.batch_size,
            folds=self.folds,
            bootstrap=self.bootstrap,
        )
        parse_merge(self.merge_classes)
        transforms(self.tta)  # refuses an unknown mode


@dataclass
class Grid:
    """Top-1 of every channel set (rows) x feature set (columns), the full k-NN results, and accuracy per epoch."""

    rows: list[str]
    columns: list[str]
    top1: np.ndarray
    details: dict = field(default_factory=dict)
    epochs: list[tuple[int, float]] = field(default_factory=list)
    #: the columns the per-epoch plot is drawn against
    epoch_baselines: dict[str, float] = field(default_factory=dict)
    classes: list[str] = field(default_factory=list)
    n_cells: int = 0
    #: the input size (px) each embedded column ran at, as its store records it
    input_sizes: dict[str, int] = field(default_factory=dict)
    #: per channel set (row): :func:`scdino.crossval.cross_validate` of every column, models against baselines
    cv: dict[str, dict] = field(default_factory=dict)


def raw_pixel_features(crops: np.ndarray, scale_lo=None, scale_hi=None) -> np.ndarray:
    """Baseline: each crop min-max scaled per channel (or by a fixed per-channel range), flattened."""
    import torch

    from scdino.preprocess import scale_intensity

    return scale_intensity(torch.from_numpy(crops.astype(np.float32)), scale_lo, scale_hi).flatten(1).numpy()


def fixed_range_of(model: str) -> tuple[Preprocessing, list[str]] | None:
    """(its Preprocessing, its channel names) when ``model`` scales intensities by a fixed per-channel range (trained
    with ``intensity_scaling=dataset``), else None."""
    from scdino.models.card import describe_model

    try:
        card = describe_model(model)
    except ConfigError:  # an RGB or random model adapts to any channel count: it has no fixed range of its own
        return None
    return (card.preprocessing, list(card.channels or [])) if card.preprocessing.scale_lo is not None else None


def check_channel_sets(models: Sequence[str], sets: Sequence[tuple[str, ...]], available: Sequence[str]) -> None:
    """Refuse, before any embedding, a channel set that a model trained on named channels (or on a fixed count) cannot
    take; the advice names --channel-sets (evaluate has no --channels)."""
    from scdino.models.card import check_channels, describe_model

    for model in models:
        try:
            card = describe_model(model)
        except ConfigError:  # an RGB or random model adapts to any channels
            continue
        for chans in sets:
            check_channels(model, card.in_chans, card.channels, len(chans), chans, available, option="--channel-sets")


def _checkpoints(run_dir: str) -> list[tuple[int, str]]:
    found = []
    for p in Path(run_dir).glob("checkpoint*.pth"):
        m = re.fullmatch(r"checkpoint(\d+)\.pth", p.name)
        if m:
            found.append((int(m.group(1)), str(p)))
    if not found:
        raise InputError(f"{run_dir}: no checkpointNNNN.pth files; pass the RUN_DIR of scdino-train")
    return sorted(found)


def _tag(j: int, model: str, name: str) -> str:
    tag = f"{j}_{re.sub(r'[^A-Za-z0-9]+', '_', Path(model).stem if '/' in model else model)}_{name}"
    return re.sub(r"[^A-Za-z0-9_+-]", "_", tag)


def store_input_size(path: str | Path) -> int:
    """The input size (px) an embeddings store's model ran at (its ``uns/scdino/preprocessing``)."""
    from anndata.io import read_elem

    return int(read_elem(zarr.open_group(str(path), mode="r")["uns"]["scdino"]["preprocessing"]["input_size"]))


def input_sizes_text(sizes: dict[str, int], requested: int | None) -> str:
    """``input 224 px`` when every model ran at one size, else each model's size; never ``None``."""
    if not sizes:
        return f"input {requested} px" if requested else "input: each model's own size"
    if len(set(sizes.values())) == 1:
        how = "" if requested else " (the models' own)"
        return f"input {next(iter(sizes.values()))} px{how}"
    return "input " + ", ".join(f"{v} px ({k})" for k, v in sizes.items())


def embed_with_run(crops: str, model: str, channels: tuple[str, ...], out: Path, settings: EvalSettings) -> np.ndarray:
    """Embeddings of every cell of ``crops`` by ``model`` on ``channels``, made by the engine's own ``run`` into
    ``out`` (a finished or interrupted grid cell of an earlier evaluate is reused or resumed)."""
    from scdino.engine.output import read_embeddings
    from scdino.engine.pipeline import RunConfig, run

    rc = RunConfig(
        plate=crops,
        out=str(out),
        model=model,
        cells=CellOptions(channels=channels),
        input_size=settings.input_size,
        batch_size=settings.batch_size,
        progress=settings.progress,
        tta=settings.tta,
    )
    try:
        run(rc)
    except OutputError:  # left by a grid with other settings: this report folder owns it
        run(replace(rc, overwrite=True))
    return read_embeddings(rc.out)[0]


def compute_grid(
    crops: str,
    models: Sequence[str],
    channel_sets: Sequence[Sequence[str]],
    outdir: Path,
    settings: EvalSettings,
    run_dir: str | None = None,
    baseline_arch: str | None = None,
) -> Grid:
    """Embed the crop store with every model and channel set (through ``run``, reusing earlier grid cells in
    ``outdir/embeddings``) and measure k-NN on each, beside the untrained and raw-pixel baselines."""
    from scdino.cells.source import open_source, read_all
    from scdino.engine.cluster import dask_client
    from scdino.knn import evaluate_knn, labels_of
    from scdino.models import embed_crops
    from scdino.models.card import describe_model

    source = open_source(crops)
    if "classes" not in source.capabilities:
        raise InputError(
            f"{crops}: evaluate needs cells with a class label ({source.kind} has none); make a labelled crop store "
            "with 'scdino-engine ingest'"
        )
    table = source.find_cells()
    labels = labels_of(table, settings.label_key, crops)
    if labels.isna().any():
        raise InputError(f"{crops}: {int(labels.isna().sum())} cells have no {settings.label_key!r}")
    y = labels.to_numpy()
    if settings.merge_classes:
        from scdino.crossval import merge_labels

        y = merge_labels(y, parse_merge(settings.merge_classes))
    sets = [tuple(s) for s in channel_sets] or [tuple(source.channel_names)]
    sources = {s: open_source(crops, CellOptions(channels=s)) for s in sets}  # unknown channels fail before any work
    check_channel_sets([*models, *([_checkpoints(run_dir)[-1][1]] if run_dir else [])], sets, source.channel_names)
    untrained = f"random:{baseline_arch or 'vit_small16'}"
    columns, fixed = _columns(models, untrained, run_dir)
    grid = Grid(["+".join(s) for s in sets], columns, np.full((len(sets), len(columns)), np.nan))
    grid.classes, grid.n_cells = sorted(set(map(str, y))), len(y)

    def knn(x: np.ndarray) -> dict:
        return evaluate_knn(x, y, settings.k, settings.temperature, settings.train_fraction, settings.seed)

    row_features: dict[str, np.ndarray] = {}

    def record(i: int, j: int, x: np.ndarray) -> None:
        r = knn(x)
        grid.top1[i, j] = r["top1"]
        grid.details[f"{columns[j]} | {grid.rows[i]}"] = r
        row_features[columns[j]] = x

    epochs = _checkpoints(run_dir) if run_dir else []
    total = len(sets) * (len(models) + 1) + len(epochs)
    with dask_client(), Progress(total, "evaluate", "embedding", settings.progress) as bar:

        def embed(model: str, chans: tuple[str, ...], tag: str, column: str) -> np.ndarray:
            x = embed_with_run(crops, model, chans, outdir / "embeddings" / f"{tag}.zarr", settings)
            if column not in grid.input_sizes:  # read once per column, not at every embedding
                grid.input_sizes[column] = store_input_size(outdir / "embeddings" / f"{tag}.zarr")
            bar.update(1)
            return x

        for i, chans in enumerate(sets):
            for j, model in enumerate([*models, untrained]):
                record(i, j, embed(model, chans, _tag(j, model, grid.rows[i]), columns[j]))
            raw = read_all(sources[chans], table)
            j = len(models) + 1
            record(i, j, raw_pixel_features(raw))
            if fixed and all(c in fixed[1] for c in chans):  # the range is known for these channels (by name)
                prep = fixed[0].select([fixed[1].index(c) for c in chans])
                net = describe_model(untrained, n_channels=len(chans), input_size=prep.input_size).load().model
                record(i, j + 1, averaged(raw, settings.tta, lambda x: embed_crops(net, x, prep)))
                record(i, j + 2, raw_pixel_features(raw, prep.scale_lo, prep.scale_hi))
            if settings.folds:
                grid.cv[grid.rows[i]] = cross_validate_row(row_features, y, len(models), settings)
            row_features.clear()
        if epochs:
            chans = sets[-1]
            for ep, ck in epochs:
                grid.epochs.append((ep, knn(embed(ck, chans, f"epoch{ep:04d}", "checkpoints"))["top1"]))
    if grid.epochs:  # drawn against the baselines of the last channel set, fixed-range ones where there are
        last = dict(zip(columns, grid.top1[-1]))
        names = [c for c in columns[len(models) :] if c.endswith("fixed range") and np.isfinite(last[c])]
        names = names or columns[len(models) : len(models) + 2]
        grid.epoch_baselines = {re.sub(r"^untrained [^,]*", "untrained", c): float(last[c]) for c in names}
    return grid


def cross_validate_row(features: dict[str, np.ndarray], y: np.ndarray, n_models: int, s: EvalSettings) -> dict:
    """Cross-validated k-NN and probe of one channel set's columns; each model is compared with every baseline (with
    no model, the untrained network with the raw pixels)."""
    from scdino.crossval import cross_validate

    names = list(features)
    firsts = names[:n_models] or names[:1]
    pairs = [(a, b) for a in firsts for b in names if b not in firsts]
    cv = cross_validate(
        features, y, folds=s.folds, seed=s.seed, k=s.k, temperature=s.temperature, n_boot=s.bootstrap, pairs=pairs
    )
    cv.pop("predictions")  # the per-cell codes would swell results.json; the scores and comparisons are what it keeps
    cv["merged"] = parse_merge(s.merge_classes)  # merged before the grid, so that both protocols see the same classes
    return cv


def _columns(models: Sequence[str], untrained: str, run_dir: str | None) -> tuple[list[str], tuple | None]:
    """The grid's feature columns, and the fixed intensity range of the first model that has one.

    A model trained with a fixed intensity range is held to baselines that keep absolute levels too: per-crop min-max
    baselines alone would credit training with what the scaling gives (README, "Keeping marker levels").
    """
    arch = untrained.split(":")[1]
    columns = list(models) + [f"untrained {arch}", "raw pixels"]
    fixed = None
    for m in [*models, *([_checkpoints(run_dir)[-1][1]] if run_dir else [])]:
        fixed = fixed or fixed_range_of(m)
    if fixed:
        columns += [f"untrained {arch}, fixed range", "raw pixels, fixed range"]
    return columns, fixed


def write_report(outdir: Path, crops: str, grid: Grid, s: EvalSettings) -> dict:
    """report.md, heatmap.png (and epochs.png) of a grid; returns the results (what results.json holds)."""
    from scdino.engine.plots import epochs_png, heatmap_png

    split = f"{int(100 * s.train_fraction)}/{100 - int(100 * s.train_fraction)}"
    heatmap_png(
        grid.top1,
        grid.rows,
        grid.columns,
        str(outdir / "heatmap.png"),
        f"k-NN top-1 (k={s.k}, T={s.temperature}, {split} split, seed {s.seed})",
    )
    result = {
        "crops": crops,
        "label_key": s.label_key,
        "classes": grid.classes,
        "n_cells": grid.n_cells,
        "rows": grid.rows,
        "columns": grid.columns,
        "top1": [[float(v) if np.isfinite(v) else None for v in row] for row in grid.top1],
        "details": grid.details,
        "k": s.k,
        "temperature": s.temperature,
        "seed": s.seed,
        "input_size": s.input_size,
        "input_sizes": grid.input_sizes,
        "merge_classes": s.merge_classes,
        "tta": s.tta,
        "cv": grid.cv,
    }
    if grid.epochs:
        epochs_png(
            [e for e, _ in grid.epochs],
            [a for _, a in grid.epochs],
            str(outdir / "epochs.png"),
            grid.epoch_baselines,
            f"k-NN top-1 per epoch ({grid.rows[-1]})",
        )
        result["epochs"] = [{"epoch": e, "top1": a} for e, a in grid.epochs]
    md = [
        f"# scdino evaluation of {crops}",
        "",
        f"{grid.n_cells} cells, classes {', '.join(grid.classes)}; k-NN k={s.k}, T={s.temperature}, "
        f"{int(100 * s.train_fraction)}% reference / rest query, seed {s.seed}; "
        f"{input_sizes_text(grid.input_sizes, s.input_size)}"
        + (f"; test-time augmentation {s.tta} ({len(transforms(s.tta))} transforms)" if s.tta != "none" else "")
        + (f"; merged classes {s.merge_classes}" if s.merge_classes else "")
        + ".",
        "",
        "| channels | " + " | ".join(grid.columns) + " |",
        "|---" * (len(grid.columns) + 1) + "|",
    ]
    for i, r in enumerate(grid.rows):
        md.append(f"| {r} | " + " | ".join(f"{100 * v:.1f}" if np.isfinite(v) else "-" for v in grid.top1[i]) + " |")
    md += ["", "![k-NN heatmap](heatmap.png)"]
    if grid.cv:
        from scdino.crossval import report_lines

        for row, cv in grid.cv.items():
            md += ["", f"## Cross-validated, with intervals: {row}", "", *report_lines(cv)]
    if grid.epochs:
        md += ["", "| epoch | top-1 |", "|---|---|", *[f"| {e} | {100 * a:.1f} |" for e, a in grid.epochs]]
        md += ["", "![per epoch](epochs.png)"]
    (outdir / "report.md").write_text("\n".join(md) + "\n")
    return result


def evaluate(
    crops: str,
    models: Sequence[str],
    channel_sets: Sequence[Sequence[str]],
    out: str,
    *,
    run_dir: str | None = None,
    baseline_arch: str | None = None,
    **settings,
) -> dict:
    """Run the grid and write ``out``/report.md, results.json, heatmap.png (and epochs.png); ``settings`` are the
    fields of :class:`EvalSettings`."""
    s = EvalSettings(**settings)
    s.validate()
    t0 = time.perf_counter()
    with claimed_dir(out, "scdino-engine evaluate", inputs=[crops, run_dir, *models]) as outdir:
        (outdir / "embeddings").mkdir(exist_ok=True)
        grid = compute_grid(crops, models, channel_sets, outdir, s, run_dir, baseline_arch)
        result = write_report(outdir, crops, grid, s)
        result["seconds"] = round(time.perf_counter() - t0, 1)
        (outdir / "results.json").write_text(json.dumps(result, indent=2))
    return result
