"""The Python API: what the commands do, as functions a notebook calls (``import scdino``; docs/api.md).

* :func:`embed`: a plate, crop store or LoadData CSV -> an AnnData of embeddings (``scdino-engine run``);
* :func:`load` -> :class:`Model`, whose :meth:`Model.embed` embeds crops already in memory, preprocessed exactly as
  the engine does (it runs on the engine's backends, which take raw crops and preprocess them on their device);
* :func:`open`: a finished store as AnnData (an unfinished one says how to resume it);
* :func:`train` (``scdino-train``) and :func:`export_model` (``scdino-export``; ``scdino.export`` is the export
  package).

The commands are thin layers over the same library functions (``run_config`` + ``run``, ``build_config`` + ``train``,
the export functions). This package sits above every stage (tests/test_layers.py). Each function lives in its own
module, imported on first use, so that ``import scdino`` stays light and a run on ONNX Runtime never imports torch.
"""

from __future__ import annotations

import importlib
from typing import Any

#: name -> the module of this package that defines it
_WHERE = {
    "embed": "embedding",
    "IN_MEMORY_MAX_BYTES": "embedding",
    "Model": "model",
    "load": "model",
    "train": "training",
    "export_model": "exporting",
    "EXPORT_FORMATS": "exporting",
    "open": "reading",
}

__all__ = list(_WHERE)


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(f"scdino.api.{_WHERE[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
