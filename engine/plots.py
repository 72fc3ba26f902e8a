"""Figures (headless matplotlib): confusion matrix, UMAP scatter, k-NN heatmap, accuracy per epoch, attention."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from scdino.cells.plate import canonical_well

#: the PNG text chunk that marks a figure as scdino's (the output guard replaces only such files)
SOFTWARE = "scdino"


def _save(fig, path: str, dpi: int) -> None:
    """Write ``fig`` to ``path`` (a PNG scdino may replace later: :func:`is_scdino_png`) and close it."""
    import matplotlib.pyplot as plt

    fig.savefig(path, dpi=dpi, metadata={"Software": SOFTWARE})
    plt.close(fig)


def is_scdino_png(path) -> bool:
    """Whether ``path`` is a figure scdino wrote."""
    try:
        from PIL import Image

        with Image.open(path) as im:
            return str(im.info.get("Software", "")).startswith(SOFTWARE)
    except Exception:  # not an image at all, or unreadable: not ours
        return False


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def confusion_png(cm: np.ndarray, classes: Sequence[str], path: str, title: str = ""):
    """Cells of each true class (rows) by predicted class (columns): the numbers are cells, the colour is the row's
    share (each row normalised to its class's cells, so a small class reads as well as a large one). Returns the
    (closed) figure."""
    plt = _plt()
    n = len(classes)
    fig, ax = plt.subplots(figsize=(max(5.6, 2.0 + 0.6 * n), max(4.2, 1.4 + 0.55 * n)))
    norm = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    cb = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    cb.set_label("share of the true class's cells (row)", fontsize=8)
    cb.ax.tick_params(labelsize=7)
    for i in range(n):
        for j in range(n):
            ax.text(
                j,
                i,
                str(cm[i, j]),
                ha="center",
                va="center",
                fontsize=8,
                color="white" if norm[i, j] > 0.6 else "black",
            )
    ax.set_xticks(range(n), classes, rotation=45, ha="right")
    ax.set_yticks(range(n), classes)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    note = "numbers: cells; colour: rows normalised (each true class sums to 1)"
    ax.set_title(f"{title}\n{note}" if title else note, fontsize=9)
    fig.tight_layout()
    _save(fig, path, 120)
    return fig


def scatter_png(xy: np.ndarray, labels: Sequence, path: str, title: str = "", max_legend: int = 20) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 5.5))
    lab = np.asarray([str(v) for v in labels])
    cats = sorted(set(lab.tolist()))
    cmap = plt.get_cmap("tab20" if len(cats) > 10 else "tab10")
    size = max(0.5, min(12.0, 3000.0 / max(len(xy), 1)))
    for i, c in enumerate(cats):
        m = lab == c
        ax.scatter(
            xy[m, 0],
            xy[m, 1],
            s=size,
            color=cmap(i % cmap.N),
            label=c if len(cats) <= max_legend else None,
            linewidths=0,
            alpha=0.8,
        )
    if len(cats) <= max_legend:
        ax.legend(markerscale=max(1, 12 / size), fontsize=7, loc="best", frameon=False)
    ax.set_xlabel("UMAP 1")
    ax.set_ylabel("UMAP 2")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    _save(fig, path, 120)


def heatmap_png(values: np.ndarray, rows: Sequence[str], cols: Sequence[str], path: str, title: str = "") -> None:
    """k-NN top-1 accuracy per channel set (rows) and model (columns), as the paper's Fig. 1B/1E/2A."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(1.8 + 1.3 * len(cols), 1.2 + 0.6 * len(rows)))
    ax.imshow(values, cmap="viridis", vmin=0, vmax=1, aspect="auto")
    for i in range(len(rows)):
        for j in range(len(cols)):
            v = values[i, j]
            ax.text(
                j,
                i,
                "-" if np.isnan(v) else f"{100 * v:.1f}",
                ha="center",
                va="center",
                fontsize=9,
                color="black" if v > 0.6 else "white",
            )
    ax.set_xticks(range(len(cols)), cols, rotation=30, ha="right")
    ax.set_yticks(range(len(rows)), rows)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    _save(fig, path, 120)


def epochs_png(
    epochs: Sequence[int], acc: Sequence[float], path: str, baselines: dict[str, float] | None = None, title: str = ""
):
    """k-NN top-1 of each checkpoint against its epoch (whole epochs on the axis), with baselines as lines. Returns
    the (closed) figure."""
    from matplotlib.ticker import MaxNLocator

    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    ax.plot(epochs, [100 * a for a in acc], "o-", label="checkpoint")
    if len(epochs) <= 12:
        ax.set_xticks(list(epochs))  # each checkpoint's epoch, and only those
        if len(epochs) == 1:
            ax.set_xlim(epochs[0] - 1, epochs[0] + 1)
    else:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    for name, v in (baselines or {}).items():
        ax.axhline(100 * v, ls="--", lw=1, label=name, color="grey" if "raw" in name else "tab:red")
    ax.set_xlabel("epoch")
    ax.set_ylabel("k-NN top-1 (%)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8, frameon=False)
    fig.tight_layout()
    _save(fig, path, 120)
    return fig


#: percentiles of the shown cells' pixels that set each channel's display range in attention figures
DISPLAY_PERCENTILES = (0.5, 99.5)


def channel_display_ranges(crops: np.ndarray, percentiles=DISPLAY_PERCENTILES) -> np.ndarray:
    """(C, 2) display range of each channel: the ``percentiles`` of that channel over all the cells shown, so that one
    channel looks the same in every cell (a marker-negative cell stays dark)."""
    x = np.moveaxis(crops.astype(np.float64), 1, 0).reshape(crops.shape[1], -1)
    lo, hi = np.percentile(x, percentiles, axis=1)
    return np.stack([lo, np.maximum(hi, lo + 1e-12)], axis=1)


def attention_png(crops: np.ndarray, attn: np.ndarray, titles: Sequence[str], channel_names: Sequence[str], path: str):
    """One row per cell: its channels (grey, one fixed range per channel for the whole figure), then the mean over
    heads and each head's last-block CLS attention, upsampled to the crop and laid over the cell; each row's colour
    bar in a column of its own, so that every panel has the same size. Returns the (closed) figure."""
    plt = _plt()
    n, c = crops.shape[:2]
    h = attn.shape[1]
    ranges = channel_display_ranges(crops)
    scaled = np.clip(
        (crops - ranges[None, :, :1, None]) / (ranges[None, :, 1:, None] - ranges[None, :, :1, None]), 0, 1
    )
    # the cell under each map: the mean of its channels on their figure-wide ranges
    under = scaled.mean(axis=1)
    maps = np.concatenate([attn.mean(axis=1, keepdims=True), attn], axis=1)  # mean over heads first
    map_titles = ["mean of heads"] + [f"head {k}" for k in range(h)]
    cols = c + h + 1
    fig = plt.figure(figsize=(1.3 * cols + 2.2, 1.3 * n + 1.1), layout="constrained")
    grid = fig.add_gridspec(n, cols + 1, width_ratios=[1.0] * cols + [0.07])
    lo, hi = DISPLAY_PERCENTILES
    for i in range(n):
        for j in range(c):
            ax = fig.add_subplot(grid[i, j])
            ax.imshow(scaled[i, j], cmap="gray", vmin=0, vmax=1)
            if i == 0:
                ax.set_title(f"{channel_names[j]}\n{ranges[j, 0]:.4g}..{ranges[j, 1]:.4g}", fontsize=8)
            if j == 0:
                ax.set_ylabel(titles[i], fontsize=8, rotation=0, ha="right", va="center")
        for k in range(h + 1):
            ax = fig.add_subplot(grid[i, c + k])
            ax.imshow(under[i], cmap="gray", vmin=0, vmax=1)
            im = ax.imshow(maps[i, k], cmap="inferno", alpha=0.6, vmin=0, vmax=float(maps[i].max()) or 1.0)
            if i == 0:
                ax.set_title(map_titles[k], fontsize=8)
        cb = fig.colorbar(im, cax=fig.add_subplot(grid[i, cols]))
        cb.ax.tick_params(labelsize=6)
        if i == 0:
            cb.ax.set_title("share of\nattention", fontsize=7)
    for ax in fig.axes[:-1]:
        if ax.get_images():
            ax.set_xticks([])
            ax.set_yticks([])
    fig.suptitle(
        f"Where the model looks: the CLS token's attention to each patch in the last block, over {n} cells\n"
        f"grey: each channel on one scale for all cells ({lo:g}th..{hi:g}th percentile, raw units above the "
        "column); colour: share of the cell's attention",
        fontsize=10,
    )
    _save(fig, path, 110)
    return fig


#: plate formats: (rows, columns)
PLATE_FORMATS = ((8, 12), (16, 24), (32, 48))


def _well_rc(well: str) -> tuple[int, int]:
    """``B/3``, ``B03`` or ``B3`` -> (row index, column index), both from 0."""
    row, col = canonical_well(well).split("/")
    return _row_index(row), int(col) - 1


def plate_format(wells) -> tuple[int, int]:
    """The smallest standard plate (96, 384, 1536 wells) that holds ``wells`` (``"B/3"`` or ``"B03"`` form)."""
    rows = max(_well_rc(w)[0] for w in wells) + 1
    cols = max(_well_rc(w)[1] for w in wells) + 1
    for r, c in PLATE_FORMATS:
        if rows <= r and cols <= c:
            return r, c
    return rows, cols


def _row_index(row: str) -> int:
    """``A`` -> 0, ``Z`` -> 25, ``AA`` -> 26, ``AF`` -> 31 (1536-well plates)."""
    i = 0
    for ch in row.upper():
        i = i * 26 + (ord(ch) - 64)
    return i - 1


def _row_name(i: int) -> str:
    return chr(65 + i) if i < 26 else chr(64 + i // 26) + chr(65 + i % 26)


def plate_heatmap_png(values: dict, path: str, title: str, label: str, cmap: str = "viridis") -> None:
    """A plate-layout heatmap of one value per well (``"B/3"`` or ``"B03"`` -> value): rows and columns labelled as on the plate,
    wells without a value left blank, a colour bar saying what the colour is."""
    plt = _plt()
    nr, nc = plate_format(values)
    grid = np.full((nr, nc), np.nan)
    for w, v in values.items():
        grid[_well_rc(w)] = v
    fig, ax = plt.subplots(figsize=(max(4.0, 0.42 * nc + 1.6), max(2.6, 0.38 * nr + 1.2)))
    im = ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, aspect="equal")
    ax.set_facecolor("#dddddd")
    step = 1 if nc <= 24 else 2
    ax.set_xticks(range(0, nc, step), [str(i + 1) for i in range(0, nc, step)], fontsize=7)
    ax.set_yticks(range(nr), [_row_name(i) for i in range(nr)], fontsize=7)
    ax.tick_params(top=True, labeltop=True, bottom=False, labelbottom=False)
    cb = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    cb.set_label(label, fontsize=8)
    ax.set_title(title, fontsize=8, pad=18)
    fig.tight_layout()
    _save(fig, path, 130)


def scatter_labels_png(
    xy: np.ndarray,
    colours: Sequence,
    names: Sequence[str],
    path: str,
    title: str,
    axis_labels: tuple[str, str] = ("", ""),
):
    """Points (one per well) coloured by a metadata value, each labelled with its well; ``axis_labels`` say what the
    axes are (e.g. ``PC 1 (43% of variance)``). Returns the (closed) figure."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 5))
    values = np.asarray([str(c) for c in colours])
    for v in sorted(set(values)):
        m = values == v
        ax.scatter(xy[m, 0], xy[m, 1], s=40, label=v)
    for (x, y), n in zip(xy, names):
        ax.annotate(n, (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
    ax.legend(fontsize=7, loc="best", frameon=False)
    ax.set_title(title, fontsize=8)
    ax.set_xlabel(axis_labels[0], fontsize=8)
    ax.set_ylabel(axis_labels[1], fontsize=8)
    ax.set_xticks([])
    ax.set_yticks([])
    fig.tight_layout()
    _save(fig, path, 130)
    return fig
