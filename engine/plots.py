"""Figures (headless matplotlib): confusion matrix, UMAP scatter, k-NN heatmap, accuracy per epoch, attention."""

from __future__ import annotations

from typing import Sequence

import numpy as np


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def confusion_png(cm: np.ndarray, classes: Sequence[str], path: str, title: str = "") -> None:
    plt = _plt()
    n = len(classes)
    fig, ax = plt.subplots(figsize=(max(5.0, 1.2 + 0.6 * n), max(4.0, 1.0 + 0.55 * n)))
    norm = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
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
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


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
    fig.savefig(path, dpi=120)
    plt.close(fig)


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
    fig.savefig(path, dpi=120)
    plt.close(fig)


def epochs_png(
    epochs: Sequence[int], acc: Sequence[float], path: str, baselines: dict[str, float] | None = None, title: str = ""
) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    ax.plot(epochs, [100 * a for a in acc], "o-", label="checkpoint")
    for name, v in (baselines or {}).items():
        ax.axhline(100 * v, ls="--", lw=1, label=name, color="grey" if "raw" in name else "tab:red")
    ax.set_xlabel("epoch")
    ax.set_ylabel("k-NN top-1 (%)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def attention_png(
    crops: np.ndarray, attn: np.ndarray, titles: Sequence[str], channel_names: Sequence[str], path: str
) -> None:
    """One row per cell: its channels (grey, min-max), then each head's attention (upsampled to the crop)."""
    plt = _plt()
    n, c = crops.shape[:2]
    h = attn.shape[1]
    fig, axes = plt.subplots(n, c + h, figsize=(1.3 * (c + h), 1.4 * n), squeeze=False)
    for i in range(n):
        for j in range(c):
            ch = crops[i, j].astype(np.float64)
            span = ch.max() - ch.min()
            axes[i, j].imshow((ch - ch.min()) / span if span > 0 else ch * 0, cmap="gray", vmin=0, vmax=1)
            if i == 0:
                axes[i, j].set_title(channel_names[j], fontsize=7)
        for k in range(h):
            axes[i, c + k].imshow(attn[i, k], cmap="inferno")
            if i == 0:
                axes[i, c + k].set_title(f"head {k}", fontsize=7)
        axes[i, 0].set_ylabel(titles[i], fontsize=6, rotation=0, ha="right", va="center")
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
