"""Training crops: from a crop store (``scdino-engine ingest``) or cut from a plate like ``scdino-engine run`` does.

Crops are held in memory as int32 (100,000 five-channel 50 px crops are 5 GB) and shuffled per epoch by a seeded
permutation shared by all DDP ranks.
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import torch

from scdino.errors import InputError

log = logging.getLogger(__name__)


def load_crops(
    path: str,
    channels=None,
    labels: str | None = None,
    segment_channel: str | None = None,
    crop_size: int = 64,
    segment=None,
    wells=None,
) -> tuple[torch.Tensor, list[str], pd.DataFrame]:
    """(crops (n, C, S, S) as int32/float32 tensor, channel names, cell table) of a crop store or plate."""
    from scdino.engine.cells import CellOptions, field_cells, plan_field, read_crops
    from scdino.engine.ingest import CropStore, is_crop_store
    from scdino.plate import Plate, resolve_channels

    if is_crop_store(path):
        store = CropStore(path)
        idx = resolve_channels(store.channels, channels, path)
        table = store.table()
        crops = store.read(np.arange(len(table)), idx)
        names = [store.channels[i] for i in idx]
    else:
        plate = Plate(path)
        from scdino.engine.segment import SegmentParams

        opts = CellOptions(
            channels=tuple(channels) if channels else None,
            labels=labels,
            segment_channel=segment_channel,
            crop_size=crop_size,
            segment=segment or SegmentParams(),
        )
        parts, tables = [], []
        names = None
        for ref in plate.fields(wells):
            plan = plan_field(plate, ref, opts)
            names = names or list(plan.channel_names)
            df = field_cells(plate, ref, opts)
            if len(df):
                parts.append(read_crops(plate, df, plan.channels, plan.crop))
                tables.append(df)
        if not parts:
            raise InputError(f"{path}: no cells found for training; check --labels / --segment-channel")
        crops, table = np.concatenate(parts), pd.concat(tables, ignore_index=True)
    if len(crops) == 0:
        raise InputError(f"{path}: no crops to train on")
    t = torch.from_numpy(crops.astype(np.int32) if crops.dtype.kind in "ui" else crops.astype(np.float32))
    log.info("%d training crops of %s, channels %s", len(t), tuple(t.shape[1:]), ", ".join(names))
    return t, list(names), table


def epoch_order(n: int, epoch: int, seed: int) -> torch.Tensor:
    """The same seeded permutation on every rank."""
    g = torch.Generator()
    g.manual_seed(seed * 7919 + epoch)
    return torch.randperm(n, generator=g)
