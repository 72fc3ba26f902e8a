"""``scdino.export_model``: ``scdino-export`` as a function (``scdino.export`` is the export package itself)."""

from __future__ import annotations

import inspect
import os
from typing import Any

from scdino.errors import ConfigError
from scdino.export.crops import load_crops
from scdino.export.onnx_export import export_onnx
from scdino.export.package import package_backbone
from scdino.export.quantize import quantize
from scdino.export.tensorrt_build import build_engine

#: what :func:`export` makes (the subcommands of ``scdino-export``)
EXPORT_FORMATS = ("onnx", "quantize", "tensorrt", "backbone")


def export_model(model: str | os.PathLike, out: str | os.PathLike, format: str = "onnx", **options: Any) -> dict:
    """Export ``model`` to ``out``, as ``scdino-export FORMAT MODEL --out OUT``; returns what the export recorded.

    * ``onnx``: MODEL is anything :func:`scdino.embed` takes; options of
      :func:`scdino.export.onnx_export.export_onnx` (``channels``, ``n_channels``, ``crop_size``, ``input_size``,
      ``dtype``, ``precision``, ``attention``, ``verify_with``); returns the sidecar ``model.json``;
    * ``quantize``: MODEL is an exported .onnx; options of :func:`scdino.export.quantize.quantize` (``method``,
      ``calibration``, ``min_cosine``); returns its sidecar;
    * ``tensorrt``: MODEL is an exported .onnx, built on this machine's GPU; options of
      :func:`scdino.export.tensorrt_build.build_engine`; returns its sidecar;
    * ``backbone``: MODEL is a training checkpoint; options ``half`` and ``key`` (the checkpoint key).

    Crops for ``verify_with`` and ``calibration`` are an array (n, C, S, S) or a .npy / .npz file of one.
    """
    model, out = str(model), str(out)
    for name in ("verify_with", "calibration"):
        if isinstance(options.get(name), (str, os.PathLike)):
            options[name] = load_crops(str(options[name]))
    if isinstance(options.get("channels"), str):
        options["channels"] = tuple(c.strip() for c in options["channels"].split(",") if c.strip())
    makers = {"onnx": export_onnx, "quantize": quantize, "tensorrt": build_engine, "backbone": package_backbone}
    if format not in makers:
        raise ConfigError(f"export format {format!r}: expected one of {', '.join(EXPORT_FORMATS)}")
    make = makers[format]
    try:
        inspect.signature(make).bind(model, out, **options)
    except TypeError as exc:  # an option this export does not take
        raise ConfigError(f"scdino.export_model(format={format!r}): {exc}") from None
    return make(model, out, **options)
