"""``scdino-engine attention``: per cell, its channels and each head's last-block CLS attention (SPEC section 4)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import zarr

from scdino.bounds import Bound, check, declare
from scdino.defaults import CHECKPOINT_KEY
from scdino.errors import ConfigError, InputError
from scdino.outputs import claimed_dir

log = logging.getLogger(__name__)

declare(per_class=Bound("cells per class", low=1, integer=True))


def _cells_and_crops(source: str, channels: Sequence[str] | None):
    """(cell table, its cell source) of a cell source, or of the cells of a finished ``run`` output (their crops read
    from the source the run recorded, with the run's options)."""
    from anndata.io import read_elem

    from scdino.cells.options import CellOptions
    from scdino.cells.source import open_source, usable_options
    from scdino.engine.output import read_embeddings, store_status

    if not store_status(source):  # not a run's output: a cell source (a crop store, a plate, a LoadData CSV)
        src = open_source(source, CellOptions(channels=tuple(channels) if channels else None))
        return src.find_cells(), src

    _, obs = read_embeddings(source)
    g = zarr.open_group(source, mode="r", use_consolidated=False)
    uns = read_elem(g["uns"]["scdino"]) if "uns" in g and "scdino" in g["uns"] else {}
    if "crop_size" not in uns or "plate" not in uns:
        raise InputError(f"{source}: neither a cell source nor an embeddings store of 'scdino-engine run'")
    used = tuple(channels) if channels else tuple(uns["channels"])
    wells = (uns.get("cells") or {}).get("wells")
    opts = CellOptions(channels=used, crop_size=int(uns["crop_size"]), wells=tuple(wells) if wells else None)
    opts, _ = usable_options(uns["plate"], opts)  # the crop size and wells where the source has them
    src = open_source(uns["plate"], opts)
    table = obs.reset_index(drop=True)
    if not src.cell_ids(table).equals(obs.index.astype(object)):
        raise InputError(
            f"{source}: its cells are not named as {uns['plate']} names them now; embed the source again with "
            "'scdino-engine run'"
        )
    return table, src


def select_cells(
    table, ids, cells: Sequence[str] | None, per_class: int | None, label_key: str | None, seed: int
):  # fmt: skip
    """Rows chosen by id (``ids``: the source's name of each row), or ``per_class`` random cells of each class,
    reproducibly."""
    ids = pd.Series(ids.astype(str), index=table.index)
    if cells:
        want = [c.strip() for c in cells]
        hit = table[ids.astype(str).isin(want)]
        missing = sorted(set(want) - set(ids[ids.astype(str).isin(want)].astype(str)))
        if missing:
            raise ConfigError(f"no cell {', '.join(missing[:5])}; cell ids look like {ids.iloc[0]}")
        return hit
    n = per_class or 4
    rng = np.random.default_rng(seed)
    if label_key:
        if label_key not in table:
            raise ConfigError(f"no column {label_key!r}; columns are {', '.join(table.columns)}")
        groups = table.groupby(table[label_key].astype(str), sort=True, observed=True).indices
        pick = [np.sort(rng.choice(v, min(n, len(v)), replace=False)) for v in groups.values()]
        return table.iloc[np.concatenate(pick)]
    return table.iloc[np.sort(rng.choice(len(table), min(n, len(table)), replace=False))]


def row_title(name: str, row, label_key: str | None = None) -> str:
    """A cell as its source titles it (``name``), under its class when there is one."""
    return f"{label_key} {row[label_key]}\n{name}" if label_key else name


def attention_command(
    source: str,
    model: str,
    out: str,
    cells: Sequence[str] | None = None,
    per_class: int | None = None,
    label_key: str | None = None,
    channels: Sequence[str] | None = None,
    input_size: int | None = None,
    checkpoint_key: str = CHECKPOINT_KEY,
    seed: int = 0,
) -> dict:
    import torch
    import torch.nn.functional as F

    from scdino.engine.plots import attention_png
    from scdino.models.card import describe_model
    from scdino.preprocess import apply

    check(per_class=per_class, input_size=input_size, seed=seed)
    with claimed_dir(out, "scdino-engine attention", inputs=[source, model]):
        table, src = _cells_and_crops(source, channels)
        names = list(src.channel_names)
        label_key = label_key or ("class" if "classes" in src.capabilities and not cells else None)
        rows = select_cells(table, src.cell_ids(table), cells, per_class, label_key, seed)
        crops = src.read(rows.reset_index(drop=True))
        lm = describe_model(model, n_channels=len(names), input_size=input_size, checkpoint_key=checkpoint_key).load()
        with torch.inference_mode():
            _, att = lm.model.forward_with_attention(apply(torch.from_numpy(crops.astype(np.float32)), lm.prep))
        g = lm.prep.input_size // lm.model.cfg.patch_size
        maps = att.reshape(len(crops), att.shape[1], g, g)
        maps = F.interpolate(maps, size=crops.shape[-2:], mode="nearest").numpy()
        ids = src.cell_ids(rows).astype(str).tolist()
        titles = [row_title(src.title(r), r, label_key) for _, r in rows.iterrows()]
        png = str(Path(out) / "attention.png")
        attention_png(crops, maps, titles, names, png)
        np.savez_compressed(Path(out) / "attention.npz", attention=maps, crops=crops, ids=np.array(ids))
        return {"png": png, "cells": len(crops), "heads": int(att.shape[1]), "untrained": lm.info["untrained"]}
