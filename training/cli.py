"""``scdino-train`` (and ``python -m scdino.training`` under torchrun)."""

from __future__ import annotations

import click

from scdino._cli import configure_logging, handle_errors
from scdino.cells.options import DEFAULT_CROP_SIZE
from scdino.training.config import TrainConfig


def _d(name: str, value=None) -> str:
    """The help text's default, read from :class:`TrainConfig` (options left out fall back to the config file, then
    to these)."""
    return f"  [default: {getattr(TrainConfig, name) if value is None else value}]"


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.option(
    "--data",
    help="Training cells: an OME-Zarr plate or a LoadData CSV (cells found as in scdino-engine run) or a crop store.",
)
@click.option("--out", help="Run folder: config.json, log.jsonl, checkpoint.pth, checkpointNNNN.pth.")
@click.option("--arch", help="vit_tiny, vit_small or vit_base." + _d("arch"))
@click.option("--patch", type=int, help="Patch size." + _d("patch"))
@click.option("--channels", help="Channels to train on, by name or index, in order. Default: all.")
@click.option("--labels", help="Plate data: nucleus label image name (default: segmentation).")
@click.option("--segment-channel", help="Plate data: channel(s) to segment and centre crops on.")
@click.option("--crop-size", type=int, help="Plate data: crop side in pixels." + _d("crop_size", DEFAULT_CROP_SIZE))
@click.option("--epochs", type=int, help=_d("epochs").strip())
@click.option("--batch-size-per-device", type=int, help=_d("batch_size_per_device").strip())
@click.option("--init", help="scratch, a hub name (dino_vits16, ...) or a checkpoint." + _d("init"))
@click.option("--config", "config_file", type=click.Path(exists=True, dir_okay=False), help="YAML or JSON options.")
@click.option("--set", "sets", multiple=True, help="Any option as key=value (e.g. --set lr=0.001), repeatable.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), help=_d("device").strip())
@click.option(
    "--extend",
    is_flag=True,
    help="Continue a finished run in --out to a larger --epochs (recorded in OUT/history.jsonl); every other setting "
    "must stay the run's own. The lr, weight-decay and momentum schedules are laid over the new length from where "
    "the run is (the warm-up is the run's own), so the result differs from a run started with that length.",
)
@click.option("-v", "--verbose", count=True)
def main(
    data,
    out,
    arch,
    patch,
    channels,
    labels,
    segment_channel,
    crop_size,
    epochs,
    batch_size_per_device,
    init,
    config_file,
    sets,
    device,
    extend,
    verbose,
) -> None:
    """DINO self-supervised training of a channel-adapted ViT on single-cell crops (the scDINO recipe).

    Every hyperparameter defaults to the recipe (SPEC section 5) and can be changed with --config or --set; the
    resolved configuration is written to OUT/config.json. Running the same command again resumes from
    OUT/checkpoint.pth; a run folder keeps its settings (other settings are refused, naming each), and --extend
    continues a finished run to more epochs. For several processes: torchrun --nproc-per-node N -m scdino.training --data ... --out ...
    """
    configure_logging(verbose)
    from scdino.training.config import build_config
    from scdino.outputs import naming_writes
    from scdino.training.loop import train

    cfg = handle_errors(
        lambda: build_config(
            config_file,
            list(sets),
            data=data,
            out=out,
            arch=arch,
            patch=patch,
            channels=[c.strip() for c in channels.split(",")] if channels else None,
            labels=labels,
            segment_channel=segment_channel,
            crop_size=crop_size,
            epochs=epochs,
            batch_size_per_device=batch_size_per_device,
            init=init,
            device=device,
        )
    )
    def run() -> dict:
        with naming_writes(cfg.out):  # a failed write names the run folder where the error names no file
            return train(cfg, extend=extend)

    s = handle_errors(run, "run the same command again to resume from the last checkpoint")
    if s.get("nothing_to_do"):
        click.echo(
            f"{cfg.out}: already trained for {s['epoch']} of {s['epochs']} epochs; nothing to do "
            "(to train longer: the same command with --extend --epochs N)"
        )
    elif s:
        click.echo(
            f"epoch {s['epoch']}: loss {s['loss']:.4f}, {s['crops_per_s']:.1f} crops/s; checkpoints in {cfg.out}"
        )


if __name__ == "__main__":
    main()
