"""``scdino-export``: checkpoints -> verified ONNX, int8 ONNX, TensorRT plans. Thin over :mod:`scdino.export`."""

from __future__ import annotations

import click

from scdino._cli import ErrorGroup, configure_logging
from scdino.batches import MAX_BATCH
from scdino.cells.options import DEFAULT_CROP_SIZE
from scdino.defaults import ADAPT, CHECKPOINT_KEY


def _load_crops(path: str | None):
    from scdino.export.crops import load_crops

    return load_crops(path)


@click.group(cls=ErrorGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.option("-v", "--verbose", count=True, help="More log output.")
@click.version_option(package_name="scdino")
def main(verbose: int) -> None:
    """scdino export: self-contained model files for the engine's ONNX Runtime and TensorRT backends.

    \b
      scdino-export onnx dino_vits16 --channels DAPI,GFP,RFP --crop-size 96 --out model.onnx
      scdino-export quantize model.onnx --out model.int8.onnx          # CPU PCs
      scdino-export tensorrt model.onnx --out model.plan --fp16        # on the GPU that will run it
      scdino-engine run plate.zarr --model model.onnx --out cells.zarr
    """
    configure_logging(verbose)


@main.command("onnx")
@click.argument("model")
@click.option("--out", required=True, type=click.Path(), help="Output .onnx file; model.json is written beside it.")
@click.option("--channels", help="Channel names in input order (recorded for the engine's --channels check).")
@click.option("--n-channels", type=int, help="Number of channels when names are not known.")
@click.option(
    "--crop-size",
    type=int,
    default=DEFAULT_CROP_SIZE,
    show_default=True,
    help="Raw crop side the model is verified at (the graph accepts other sizes too).",
)
@click.option(
    "--input-size",
    type=int,
    help="Model input side after resizing. Default: the size the model was trained at (224 for DINO's).",
)
@click.option(
    "--dtype",
    type=click.Choice(["uint16", "uint8", "float32"]),
    default="uint16",
    show_default=True,
    help="Dtype of the raw crops the graph takes.",
)
@click.option(
    "--precision",
    type=click.Choice(["fp32", "fp16"]),
    default="fp32",
    show_default=True,
    help="fp16 (GPUs) keeps preprocessing and LayerNorm in fp32.",
)
@click.option("--attention", is_flag=True, help="Second output: last block's CLS-to-patch attention per head.")
@click.option("--checkpoint-key", default=CHECKPOINT_KEY, show_default=True)
@click.option("--adapt", default=ADAPT, show_default=True, help="Channel adaptation of RGB models.")
@click.option(
    "--verify-crops",
    type=click.Path(exists=True, dir_okay=False),
    help="Crops (.npy / .npz) to verify on. Default: real nucleus crops shipped with scdino.",
)
def onnx_cmd(
    model,
    out,
    channels,
    n_channels,
    crop_size,
    input_size,
    dtype,
    precision,
    attention,
    checkpoint_key,
    adapt,
    verify_crops,
) -> None:
    """Export MODEL (anything scdino-engine run --model accepts) to ONNX with preprocessing inside, verified."""
    from scdino.export.onnx_export import export_onnx

    names = tuple(c.strip() for c in channels.split(",")) if channels else None
    meta = export_onnx(
        model,
        out,
        n_channels=n_channels,
        channels=names,
        crop_size=crop_size,
        input_size=input_size,
        dtype=dtype,
        attention=attention,
        precision=precision,
        checkpoint_key=checkpoint_key,
        adapt=adapt,
        verify_with=_load_crops(verify_crops),
    )
    v = meta["verification"]
    click.echo(
        f"wrote {out} ({meta['arch']}, {meta['in_chans']} channels, {dtype} crops, {precision}); verified "
        f"against PyTorch: max abs diff {v['max_abs_diff']:.2e}, min cosine {v['min_cosine']:.6f}"
    )


@main.command("quantize")
@click.argument("model", type=click.Path(exists=True, dir_okay=False))
@click.option("--out", required=True, type=click.Path())
@click.option(
    "--method",
    type=click.Choice(["dynamic", "static"]),
    default="dynamic",
    show_default=True,
    help="dynamic: weights quantised once, activations per batch; the fastest weight form that keeps cosine 0.999 "
    "on the check crops (signed 8-bit per channel on CPUs with VNNI, 7-bit elsewhere, else unsigned). "
    "static: calibrated QDQ activations and weights.",
)
@click.option(
    "--calibration",
    type=click.Path(exists=True, dir_okay=False),
    help="Crops (.npy / .npz) for calibration and the quality report. Default: shipped real crops.",
)
@click.option(
    "--min-cosine",
    type=float,
    default=0.99,
    show_default=True,
    help="Refuse the int8 copy when any check crop's cosine to fp32 is below this.",
)
def quantize_cmd(model, out, method, calibration, min_cosine) -> None:
    """int8 copy of an exported fp32 MODEL for CPU PCs, with cosine and k-NN change against fp32."""
    from scdino.export.quantize import SATURATED_WARN, quantize

    q = quantize(model, out, method=method, calibration=_load_crops(calibration), min_cosine=min_cosine)["quantization"]
    acc = q["knn_leave_one_out_top1"]
    click.echo(
        f"wrote {out} (int8 {method}, {q['weights']} weights): cosine to fp32 on {q['n_crops']} check crops min "
        f"{q['min_cosine_to_fp32']:.5f}, "
        f"median {q['median_cosine_to_fp32']:.5f}; leave-one-out k-NN top-1 on those crops, each labelled by its "
        f"brightest channel (a label from the pixels, not a biological class): fp32 {acc['fp32']:.3f}, "
        f"int8 {acc['int8']:.3f}"
        + (
            f". Warning: the model's fixed intensity range clips {100 * q['check_pixels_clipped']:.0f}% of these "
            "crops' pixels, so these numbers say little; pass --calibration with crops of the model's own data"
            if q.get("check_pixels_clipped", 0) > SATURATED_WARN
            else ""
        )
    )


@main.command("tensorrt")
@click.argument("model", type=click.Path(exists=True, dir_okay=False))
@click.option("--out", required=True, type=click.Path())
@click.option("--fp16", is_flag=True, help="Half precision (LayerNorm and preprocessing stay fp32).")
@click.option("--int8", is_flag=True, help="int8 with Q/DQ calibrated on --calibration crops.")
@click.option("--calibration", type=click.Path(exists=True, dir_okay=False), help="Crops (.npy / .npz) for int8.")
@click.option(
    "--max-batch",
    type=int,
    default=MAX_BATCH,
    show_default=True,
    help="Largest batch the plan takes (the engine's largest batch on a GPU).",
)
@click.option(
    "--opt-batch",
    type=int,
    help="Batch the plan is tuned for; the engine's TensorRT backend sends batches of this size. Default: the batch "
    "scdino-engine run sends this model on a GPU (256 for ViT-S/16 at 224 px, 128 at 320 px, 64 for ViT-B/8 at 224).",
)
@click.option("--workspace-gb", type=float, default=4.0, show_default=True)
@click.option("--timing-cache", type=click.Path(), help="Timing cache file. Default: OUT with .timing.cache.")
def tensorrt_cmd(model, out, fp16, int8, calibration, max_batch, opt_batch, workspace_gb, timing_cache) -> None:
    """Build a TensorRT plan from an exported MODEL on this machine's GPU (plans run only where built)."""
    from scdino.export.tensorrt_build import build_engine

    meta = build_engine(
        model,
        out,
        fp16=fp16,
        int8=int8,
        calibration=_load_crops(calibration),
        max_batch=max_batch,
        opt_batch=opt_batch,
        workspace_gb=workspace_gb,
        timing_cache=timing_cache,
    )
    t = meta["tensorrt"]
    p = t["profile"]
    how = "as its layers report" if t["precision_from"] == "engine inspector" else "as asked: its layers did not tell"
    click.echo(
        f"wrote {out} for {t['gpu']} (sm {t['compute_capability']}, TensorRT {t['version']}, "
        f"{meta['precision']} {how}, batches {p['min']}..{p['max']} tuned for {p['opt']}) "
        f"in {t['build_seconds']} s"
    )


@main.command("backbone")
@click.argument("checkpoint")
@click.option("--out", required=True, type=click.Path())
@click.option("--half", is_flag=True, help="Store the weights in float16 (half the size; loaded back as float32).")
@click.option("--checkpoint-key", default=CHECKPOINT_KEY, show_default=True)
def backbone_cmd(checkpoint, out, half, checkpoint_key) -> None:
    """A compact model file from a training checkpoint: the backbone and its channels, mean/std and input size."""
    from scdino.export.package import package_backbone

    info = package_backbone(checkpoint, out, half, checkpoint_key)
    click.echo(f"wrote {out} ({info['arch']}, {info['mb']:.1f} MB, channels {', '.join(info['channels'] or [])})")


if __name__ == "__main__":
    main()
