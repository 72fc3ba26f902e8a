"""The one home of the bounds of every numeric option of ``scdino-engine``: what each may be, and what 0 means where
0 is allowed. A bad number is refused here, in one line naming the option, before any work starts; no option takes 0
(or a negative number) as a silent "use the default".

Light on purpose (no numpy), so that the configs that call it stay importable for ``--help``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from scdino.errors import ConfigError


@dataclass(frozen=True)
class Bound:
    """The values an option takes: ``low`` <= value (< with ``low_open``), value <= ``high`` (< with ``high_open``),
    a whole number with ``integer``. ``what`` says what the option is (in the error)."""

    what: str
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    integer: bool = False

    def expected(self) -> str:
        kind = "a whole number" if self.integer else "a number"
        parts = []
        if self.low is not None:
            parts.append(f"{'above' if self.low_open else 'at least'} {_num(self.low)}")
        if self.high is not None:
            parts.append(f"{'below' if self.high_open else 'at most'} {_num(self.high)}")
        if not parts:
            return kind
        return f"{kind} {'of ' if parts[0].startswith('at ') else ''}{' and '.join(parts)}"

    def admits(self, value: float) -> bool:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return False
        if self.integer and float(value) != int(value):
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        if self.high is not None and (value >= self.high if self.high_open else value > self.high):
            return False
        return True


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


#: every numeric option of scdino-engine, by its command-line name (a test checks that none is missing)
BOUNDS: dict[str, Bound] = {
    # run: how cells are found and cut
    "--sigma": Bound("gaussian smoothing in px; 0: none", low=0),
    "--min-distance": Bound("least distance between nucleus centres in px; 0: no split", low=0, integer=True),
    "--min-area": Bound("smallest nucleus in px; 0: no lower bound", low=0, integer=True),
    "--max-area": Bound("largest nucleus in px; 0: no upper bound", low=0, integer=True),
    "--crop-size": Bound("crop side in px", low=4, integer=True),
    "--crop-um": Bound("crop side in micrometres", low=0, low_open=True),
    # run, evaluate, attention: the model
    "--input-size": Bound("model input side in px", low=1, integer=True),
    # run: how the work is split
    "--batch-size": Bound("crops per forward pass", low=1, integer=True),
    "--chunk-cells": Bound("cells per block", low=1, integer=True),
    "--workers": Bound("worker processes", low=1, integer=True),
    "--threads": Bound("torch threads per worker", low=1, integer=True),
    "--feeders": Bound("feeder processes per worker; 0: none", low=0, high=256, integer=True),
    # knn, evaluate: the k-NN protocol
    "--k": Bound("neighbours that vote", low=1, integer=True),
    "--temperature": Bound("vote temperature of exp(similarity / T)", low=0, low_open=True),
    "--train-fraction": Bound(
        "share of the labelled cells used as the reference", low=0, high=1, low_open=True, high_open=True
    ),
    # evaluate: cross-validation with intervals
    "--folds": Bound("folds of the stratified cross-validation; 0: none", low=0, integer=True),
    "--bootstrap": Bound("bootstrap resamples of the cells for the 95% intervals", low=100, integer=True),
    # umap
    "--n-neighbors": Bound("UMAP neighbours", low=2, integer=True),
    "--min-dist": Bound("UMAP least distance between embedded points", low=0),
    "--spread": Bound("UMAP spread", low=0, low_open=True),
    "--epochs": Bound("UMAP optimisation epochs", low=1, integer=True),
    "--fit-max": Bound("cells UMAP is fitted on", low=3, integer=True),
    # attention, replicates
    "--per-class": Bound("cells per class", low=1, integer=True),
    "--null-draws": Bound("random well groups in the null", low=1, integer=True),
    # every command with a seed (numpy's generators take 0 .. 2**32 - 1)
    "--seed": Bound("random seed", low=0, high=2**32 - 1, integer=True),
}


def check(**values: float | None) -> None:
    """Refuse the first value outside its option's bounds. Keywords are option names with ``_`` for ``-``
    (``chunk_cells=0`` is ``--chunk-cells 0``); None means "not given" and is skipped."""
    for key, value in values.items():
        if value is None:
            continue
        option = "--" + key.replace("_", "-")
        bound = BOUNDS[option]
        if not bound.admits(value):
            raise ConfigError(f"{option} {value}: expected {bound.expected()} ({bound.what})")


def check_segmentation(sigma: float, threshold: str, min_distance: int, min_area: int, max_area: int) -> None:
    """The built-in segmentation's options: each in its bounds, the threshold a method or a number, and an area range
    that some nucleus can pass."""
    check(sigma=sigma, min_distance=min_distance, min_area=min_area, max_area=max_area)
    if str(threshold) not in ("otsu", "li"):
        try:
            number = float(threshold)
        except ValueError:
            number = math.nan
        if not math.isfinite(number):
            raise ConfigError(f"--threshold {threshold}: expected otsu, li or a number (raw intensity)")
    if 0 < max_area < min_area:
        raise ConfigError(
            f"--max-area {max_area} is below --min-area {min_area}: no nucleus can pass; raise --max-area (0: no "
            "upper bound) or lower --min-area"
        )


def check_umap(n_neighbors: int | None, min_dist: float | None, spread: float | None, n_epochs: int | None) -> None:
    """UMAP's settings: each in its bounds, and min_dist no larger than spread (umap-learn's rule)."""
    check(n_neighbors=n_neighbors, min_dist=min_dist, spread=spread, epochs=n_epochs)
    if min_dist is not None and spread is not None and min_dist > spread:
        raise ConfigError(f"--min-dist {min_dist} is above --spread {spread}; UMAP needs min_dist <= spread")


def check_block_memory(chunk_cells: int, channels: int, crop: int, itemsize: int, available: int) -> None:
    """Refuse blocks whose crops do not fit in memory: one block of ``chunk_cells`` crops (``channels`` x ``crop`` x
    ``crop`` pixels of ``itemsize`` bytes) is held as read and as float32 for the model, and must take at most half
    of the ``available`` bytes (the rest is for the model, the next block being read and everything else)."""
    need = chunk_cells * channels * crop * crop * (itemsize + 4)
    if need > available // 2:
        raise ConfigError(
            f"--crop-size {crop} with --chunk-cells {chunk_cells}: one block of {channels}-channel crops takes "
            f"{need / 2**30:.2f} GiB (as read and as float32), more than half of the {available / 2**30:.2f} GiB of "
            "memory available; pass a smaller --chunk-cells or --crop-size"
        )
