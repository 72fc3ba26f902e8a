"""scdino: single-cell embeddings of multichannel microscopy with channel-adapted DINO vision transformers.

Importing :mod:`scdino` is cheap: torch, dask and the plate readers are imported by the submodules that need them.
"""

__version__ = "0.1.0"

from scdino.errors import (  # noqa: E402
    CheckpointError,
    ConfigError,
    InputError,
    OutputError,
    ScdinoError,
)

__all__ = ["__version__", "ScdinoError", "InputError", "CheckpointError", "ConfigError", "OutputError"]
