"""scdino: single-cell embeddings of multichannel microscopy with channel-adapted DINO vision transformers.

The Python API (docs/api.md): ``scdino.embed`` (a plate -> AnnData), ``scdino.open`` (a finished store -> AnnData),
``scdino.load`` (a model for crops in memory),
``scdino.train`` and ``scdino.export_model``, the library under the commands (:mod:`scdino.api`).

Importing :mod:`scdino` is cheap: torch, dask and the plate readers are imported by the submodules that need them, and
the API's functions on first use.
"""

__version__ = "0.1.0"

from scdino.errors import (  # noqa: E402
    CheckpointError,
    ConfigError,
    InputError,
    OutputError,
    ScdinoError,
)

#: the API (scdino.api), imported on first use: the package's front door, above every stage
API = ("embed", "load", "Model", "open", "train", "export_model")

__all__ = ["__version__", "ScdinoError", "InputError", "CheckpointError", "ConfigError", "OutputError", *API]


def __getattr__(name: str):
    if name in API:
        import scdino.api

        return getattr(scdino.api, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
