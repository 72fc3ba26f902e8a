"""Training crops, from any cell source (a crop store, or a plate whose cells are found exactly as ``scdino-engine run``
finds them: :mod:`scdino.cells.source`).

Crops are held in memory as int32 (100,000 five-channel 50 px crops are 5 GB) and shuffled per epoch by a seeded
permutation shared by all DDP ranks.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import numpy as np
import torch

from scdino.cells.options import CellOptions
from scdino.errors import InputError

if TYPE_CHECKING:
    import pandas as pd

log = logging.getLogger(__name__)


def load_crops(path: str, opts: CellOptions = CellOptions()) -> tuple[torch.Tensor, list[str], pd.DataFrame]:
    """(crops (n, C, S, S) as int32/float32 tensor, channel names, cell table) of the cell source at ``path``."""
    from scdino.cells.source import open_source, read_all, usable_options

    # a config written for another kind of source (or by an older scdino, which recorded crop_size 64) still trains
    opts, ignored = usable_options(path, opts)
    if ignored:
        log.warning("%s: %s do not apply and are ignored (options of another kind of source)", path, ", ".join(ignored))
    source = open_source(path, opts)
    table = source.find_cells()
    crops = read_all(source, table)
    if len(crops) == 0:
        raise InputError(f"{path}: no crops to train on")
    t = torch.from_numpy(crops.astype(np.int32) if crops.dtype.kind in "ui" else crops.astype(np.float32))
    names = list(source.channel_names)
    log.info("%d training crops of %s, channels %s", len(t), tuple(t.shape[1:]), ", ".join(names))
    return t, names, table


def epoch_order(n: int, epoch: int, seed: int) -> torch.Tensor:
    """The same seeded permutation on every rank."""
    g = torch.Generator()
    g.manual_seed(seed * 7919 + epoch)
    return torch.randperm(n, generator=g)
