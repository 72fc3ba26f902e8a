"""Does scdino-train learn what pixels do not? The label-free cell-cycle model against every baseline, on real Jurkat
cells it never saw (``benchmarks/data/jurkat_cellcycle/holdout.zarr``, the fixed stratified 20% of the set).

Feature sets, per channel set (BF+DF: the label-free question; BF+DNA+DF; DNA):

- trained models, where given: ``--bf-df MODEL`` and ``--bf-dna-df MODEL`` (scdino-train checkpoints, e.g. the ones
  ``benchmarks/train_recipes.py`` keeps; none ships), embedded by ``scdino-engine run`` itself;
- the same architecture untrained (``random:vit_tiny8`` at the same input size, per-crop min-max), and, for a model
  trained with a fixed intensity range, the untrained twin with that same range (the gate a shipped model must pass);
- raw pixels, each crop min-max scaled per channel (the paper's preprocessing), flattened;
- raw pixels scaled by one fixed range per channel (0.1 / 99.9th percentiles of the training cells' pixels);
- hand-crafted morphology (:mod:`scdino.engine.morphology`: shape, intensity and texture per channel, as CellProfiler
  measures them), standardised with the reference cells' mean and sd.

Two k-NN protocols (k=20, T=0.07, cosine, as the paper):

- **held-out splits**: the held-out cells only, stratified 80/20 reference/query splits over ``--seeds`` seeds: mean and
  sd of top-1 and balanced accuracy, and on how many splits the trained model is ahead of each baseline;
- **train -> held-out**: the training cells (their labels) as reference, every held-out cell a query once; per-class
  recall and the confusion matrix of the trained model come from this one.

Writes ``benchmarks/results/jurkat_cellcycle.json``, the README table (``jurkat_cellcycle.md``), the confusion
matrix and a UMAP of the held-out cells coloured by class (``jurkat_cellcycle_*.png``).

    python benchmarks/jurkat_cellcycle.py [--bf-df MODEL] [--bf-dna-df MODEL] [--seeds 20] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
from harness import write_results

DATA = Path(__file__).parent / "data" / "jurkat_cellcycle"
CHANNEL_SETS = {"BF+DF": ("BF", "DF"), "BF+DNA+DF": ("BF", "DNA", "DF"), "DNA": ("DNA",)}
MODELS: dict[str, str] = {}  # channel set -> trained model, from the command line
UNTRAINED = "random:vit_tiny8"
INPUT_SIZE = 40
PERCENTILES = (0.1, 99.9)


def _embed(store: Path, model: str, channels: tuple[str, ...], work: Path) -> np.ndarray:
    from scdino.cells.options import CellOptions
    from scdino.engine.output import read_embeddings
    from scdino.engine.pipeline import RunConfig, run

    out = work / f"{len(list(work.iterdir()))}.zarr"
    run(
        RunConfig(
            plate=str(store),
            out=str(out),
            model=model,
            cells=CellOptions(channels=channels),
            input_size=INPUT_SIZE,
            progress=False,
        )
    )
    return read_embeddings(str(out))[0]


def _knn(ref, ref_y, query, query_y, classes):
    from sklearn.metrics import balanced_accuracy_score

    from scdino.knn import knn_predict

    code = {c: i for i, c in enumerate(classes)}
    pred = knn_predict(ref, np.array([code[c] for c in ref_y]), query, n_classes=len(classes))
    truth = np.array([code[c] for c in query_y])
    return float((pred == truth).mean()), float(balanced_accuracy_score(truth, pred)), pred, truth


def _standardise(ref: np.ndarray, query: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mu, sd = ref.mean(0), ref.std(0)
    sd[sd == 0] = 1
    return (ref - mu) / sd, (query - mu) / sd


def features(train, held, set_name: str, work: Path) -> dict[str, tuple[np.ndarray, np.ndarray, bool]]:
    """{feature set: (training cells' features, held-out cells' features, standardise?)} for one channel set."""
    import torch

    from scdino.engine.evaluate import raw_pixel_features
    from scdino.training.augment import intensity_range

    names = CHANNEL_SETS[set_name]
    idx = [train["channels"].index(c) for c in names]
    tr, he = train["crops"][:, idx], held["crops"][:, idx]
    out = {}
    if set_name in MODELS:
        model = MODELS[set_name]
        out["trained model"] = tuple(_embed(s, model, names, work) for s in (train["path"], held["path"])) + (False,)
        twin = _untrained_twin(model, work)
        if twin:
            out["untrained ViT-tiny/8, the model's fixed range"] = tuple(
                _embed(s, twin, names, work) for s in (train["path"], held["path"])
            ) + (False,)
    out["untrained ViT-tiny/8"] = tuple(_embed(s, UNTRAINED, names, work) for s in (train["path"], held["path"])) + (
        False,
    )
    out["raw pixels, min-max per crop"] = (raw_pixel_features(tr), raw_pixel_features(he), False)
    lo, hi = intensity_range(torch.from_numpy(tr.astype(np.float32)), PERCENTILES)
    out["raw pixels, fixed range per channel"] = (raw_pixel_features(tr, lo, hi), raw_pixel_features(he, lo, hi), False)
    cols = _morph_cols(names)
    out["morphology (scikit-image)"] = (train["morph"][:, cols], held["morph"][:, cols], True)
    return out


def _untrained_twin(model: str, work: Path) -> str | None:
    """The model's file with its weights replaced by a seeded untrained network of the same architecture (same
    channels, input size and fixed intensity range); None for a model without a fixed range."""
    import torch

    from scdino.models.checkpoint import read_checkpoint
    from scdino.models.vit import VisionTransformer

    ck = read_checkpoint(model, "teacher")
    if ck.meta.get("scale_lo") is None:
        return None
    torch.manual_seed(0)
    path = work / "untrained_twin.pth"
    torch.save({"model": VisionTransformer(ck.config).state_dict(), "scdino": dict(ck.meta)}, path)
    return str(path)


def _morph_cols(names: tuple[str, ...]) -> np.ndarray:
    from scdino.engine.morphology import feature_names

    every = feature_names(CHANNEL_SETS["BF+DNA+DF"])
    return np.array([i for i, f in enumerate(every) if f.split("_")[0] in names])


def _load(name: str) -> dict:
    from scdino.cells.cropstore import CropStore
    from scdino.engine.morphology import morphology_features

    path = DATA / f"{name}.zarr"
    store = CropStore(path)
    crops = store.array[:]
    t0 = time.perf_counter()
    morph = morphology_features(crops)
    return {
        "path": path,
        "crops": crops,
        "labels": store.table()["class"].astype(str).to_numpy(),
        "channels": store.channels,
        "morph": morph,
        "morph_seconds": time.perf_counter() - t0,
    }


def _plots(out: Path, held_labels, emb, cm, classes) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import umap

    fig, ax = plt.subplots(figsize=(5.5, 4.8))
    im = ax.imshow(cm / np.maximum(cm.sum(1, keepdims=True), 1), cmap="Blues", vmin=0, vmax=1)
    for i in range(len(classes)):
        for j in range(len(classes)):
            ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=7)
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true (held-out cells)")
    ax.set_title("trained BF+DF model, k-NN from the training cells", fontsize=9)
    fig.colorbar(im, ax=ax, label="fraction of the true class")
    fig.tight_layout()
    fig.savefig(out / "jurkat_cellcycle_confusion.png", dpi=120)
    plt.close(fig)
    xy = umap.UMAP(n_neighbors=15, min_dist=0.3, metric="cosine", random_state=0).fit_transform(emb)
    fig, ax = plt.subplots(figsize=(6, 5))
    cmap = plt.get_cmap("tab10")
    for i, c in enumerate(classes):
        m = held_labels == c
        ax.scatter(xy[m, 0], xy[m, 1], s=8, color=cmap(i), label=f"{c} ({m.sum()})")
    ax.legend(fontsize=7, markerscale=2)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title("held-out Jurkat cells, trained BF+DF model (no DNA stain)", fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "jurkat_cellcycle_umap.png", dpi=120)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bf-df", help="a model trained on BF+DF (scdino-train checkpoint)")
    ap.add_argument("--bf-dna-df", help="a model trained on BF+DNA+DF")
    ap.add_argument("--seeds", type=int, default=20, help="held-out reference/query splits")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args()
    MODELS.update({k: v for k, v in (("BF+DF", args.bf_df), ("BF+DNA+DF", args.bf_dna_df)) if v})
    from sklearn.metrics import confusion_matrix

    from scdino.knn import split

    train, held = _load("train"), _load("holdout")
    classes = sorted(set(train["labels"]))
    work = Path(tempfile.mkdtemp(prefix="scdino-jurkat-"))
    results, extra = [], {}
    for set_name in CHANNEL_SETS:
        feats = features(train, held, set_name, work)
        splits = [split(held["labels"], 0.8, s)[:2] for s in range(args.seeds)]
        per_set = []
        for fname, (ftr, fhe, std) in feats.items():
            top, bal = [], []
            for r, q in splits:
                a, b = (fhe[r], fhe[q]) if not std else _standardise(fhe[r], fhe[q])
                t1, ba, _, _ = _knn(a, held["labels"][r], b, held["labels"][q], classes)
                top.append(t1)
                bal.append(ba)
            a, b = (ftr, fhe) if not std else _standardise(ftr, fhe)
            t1, ba, pred, truth = _knn(a, train["labels"], b, held["labels"], classes)
            row = {
                "channels": set_name,
                "features": fname,
                "dims": int(ftr.shape[1]),
                "heldout_top1": top,
                "heldout_balanced": bal,
                "top1_mean": float(np.mean(top)),
                "top1_sd": float(np.std(top)),
                "balanced_mean": float(np.mean(bal)),
                "balanced_sd": float(np.std(bal)),
                "train_to_heldout_top1": t1,
                "train_to_heldout_balanced": ba,
                "recall": {
                    c: float((pred[truth == i] == i).mean()) for i, c in enumerate(classes) if (truth == i).any()
                },
            }
            per_set.append(row)
            if fname == "trained model":
                cm = confusion_matrix(truth, pred, labels=range(len(classes)))
                row["confusion"] = cm.tolist()
                if set_name == "BF+DF":
                    extra = {"cm": cm, "emb": fhe}
        lead = next((r for r in per_set if r["features"] == "trained model"), None)
        for r in per_set:
            if lead is not None and r is not lead:
                d_top = np.array(lead["heldout_top1"]) - np.array(r["heldout_top1"])
                d_bal = np.array(lead["heldout_balanced"]) - np.array(r["heldout_balanced"])
                r["model_minus_this_top1"] = float(d_top.mean())
                r["model_minus_this_balanced"] = float(d_bal.mean())
                r["model_ahead_top1"] = int((d_top > 0).sum())
                r["model_ahead_balanced"] = int((d_bal > 0).sum())
        results += per_set
    args.out.mkdir(parents=True, exist_ok=True)
    if extra:
        _plots(args.out, held["labels"], extra["emb"], extra["cm"], classes)
    table = _table(results, args.seeds, classes)
    print(table)
    (args.out / "jurkat_cellcycle.md").write_text(table)
    res = {
        "benchmark": "jurkat_cellcycle",
        "cells": {"train": len(train["labels"]), "holdout": len(held["labels"])},
        "classes": classes,
        "protocol": {
            "k": 20,
            "temperature": 0.07,
            "split": "stratified 80/20 of the held-out cells",
            "seeds": args.seeds,
        },
        "models": {**MODELS, "untrained": UNTRAINED, "input_size": INPUT_SIZE},
        "morphology_seconds_per_cell": (train["morph_seconds"] + held["morph_seconds"])
        / (len(train["labels"]) + len(held["labels"])),
        "results": results,
    }
    write_results(args.out / "jurkat_cellcycle.json", res)
    print(f"\nwrote {args.out / 'jurkat_cellcycle.json'}, jurkat_cellcycle.md and the figures")


def _table(results: list[dict], seeds: int, classes: list[str]) -> str:
    lines = [
        f"k-NN on the held-out cells: mean +- sd over {seeds} stratified 80/20 splits of them; then the training cells "
        "as reference for every held-out cell (one number); the last column: the trained model minus this feature "
        f"set on the same splits, top-1 / balanced (splits where the model is ahead, of {seeds})",
        "",
        "| channels | features | top-1 | balanced | train -> held-out top-1 / balanced | trained model minus this |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        diff = ""
        if "model_minus_this_top1" in r:
            diff = (
                f"{100 * r['model_minus_this_top1']:+.1f} ({r['model_ahead_top1']}) / "
                f"{100 * r['model_minus_this_balanced']:+.1f} ({r['model_ahead_balanced']})"
            )
        name = f"**{r['features']}**" if r["features"] == "trained model" else r["features"]
        lines.append(
            f"| {r['channels']} | {name} | {100 * r['top1_mean']:.1f} +- {100 * r['top1_sd']:.1f} | "
            f"{100 * r['balanced_mean']:.1f} +- {100 * r['balanced_sd']:.1f} | "
            f"{100 * r['train_to_heldout_top1']:.1f} / {100 * r['train_to_heldout_balanced']:.1f} | {diff} |"
        )
    lines += ["", "Recall per class, train -> held-out:", ""]
    lines.append("| channels | features | " + " | ".join(classes) + " |")
    lines.append("|---|---|" + "---|" * len(classes))
    for r in results:
        lines.append(
            f"| {r['channels']} | {r['features']} | "
            + " | ".join(f"{100 * r['recall'].get(c, float('nan')):.0f}" for c in classes)
            + " |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
