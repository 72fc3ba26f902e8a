"""``scdino.train``: ``scdino-train`` as a function."""

from __future__ import annotations

import os
from typing import Any

from scdino.training.config import build_config
from scdino.training.loop import train as train_loop


def train(
    data: str | os.PathLike,
    out: str | os.PathLike,
    *,
    config: str | os.PathLike | None = None,
    extend: bool = False,
    **options: Any,
) -> dict:
    """Train a model on the cells of ``data`` into the run folder ``out``, as ``scdino-train --data DATA --out OUT``.

    ``options``: any field of :class:`scdino.training.config.TrainConfig` (``arch``, ``patch``, ``epochs``, ``lr``,
    ``global_size``, ``segment_channel``, ...); ``config``: a YAML or JSON file of them (``options`` win). Calling it
    again resumes; ``extend=True`` continues a finished run to a larger ``epochs``. Returns the last epoch's summary
    (``{"nothing_to_do": True, ...}`` when the run had already finished); the model is ``out/checkpoint.pth``.
    """
    cfg = build_config(str(config) if config else None, (), data=str(data), out=str(out), **options)
    return train_loop(cfg, extend=extend)
