"""``scdino-engine knn``: the paper's k-NN evaluation of an embeddings store, and classification of unlabelled
cells against a labelled reference (SPEC section 4; the vote itself is :func:`scdino.knn.knn_predict`)."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import pandas as pd

from scdino.errors import ConfigError, InputError
from scdino.knn import knn_predict

log = logging.getLogger(__name__)


def read_embeddings(path: str, key: str = "X_scdino") -> tuple[np.ndarray, pd.DataFrame]:
    import anndata as ad

    from scdino.engine.output import store_status

    st = store_status(path)
    if st is None:
        raise InputError(f"{path}: no such embeddings store; make one with 'scdino-engine run'")
    if st and st.get("status") not in (None, "complete"):
        raise InputError(f"{path}: the run that writes it is not complete; run the same command again to finish it")
    a = ad.read_zarr(path)
    if key not in a.obsm:
        raise InputError(f"{path}: no obsm[{key!r}] (has {', '.join(a.obsm) or 'none'})")
    return np.asarray(a.obsm[key], dtype=np.float32), a.obs


def labels_of(obs: pd.DataFrame, key: str, path: str) -> pd.Series:
    if key not in obs:
        raise ConfigError(f"{path}: no obs column {key!r}; columns are {', '.join(obs.columns)}; pass --label-key")
    return obs[key].astype("object").where(obs[key].notna(), None)


def split(labels: np.ndarray, train_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray, bool]:
    """Seeded split, stratified by class where every class has at least two cells."""
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(labels))
    _, counts = np.unique(labels, return_counts=True)
    strat = labels if counts.min() >= 2 and len(labels) * (1 - train_fraction) >= len(counts) else None
    tr, te = train_test_split(idx, train_size=train_fraction, random_state=seed, stratify=strat)
    return np.sort(tr), np.sort(te), strat is not None


def evaluate_knn(
    x: np.ndarray,
    labels: np.ndarray,
    k: int = 20,
    temperature: float = 0.07,
    train_fraction: float = 0.8,
    seed: int = 0,
    device: str = "cpu",
) -> dict:
    """Top-1, balanced accuracy, per-class recall and confusion matrix of the weighted k-NN vote."""
    from sklearn.metrics import balanced_accuracy_score, confusion_matrix

    classes = sorted(set(labels.tolist()), key=str)  # codes from the whole set: stable when a split lacks a class
    code = {c: i for i, c in enumerate(classes)}
    y = np.array([code[v] for v in labels])
    tr, te, stratified = split(y, train_fraction, seed)
    pred = knn_predict(x[tr], y[tr], x[te], k=k, temperature=temperature, n_classes=len(classes), device=device)
    cm = confusion_matrix(y[te], pred, labels=range(len(classes)))
    recall = {str(c): float(cm[i, i] / cm[i].sum()) if cm[i].sum() else None for i, c in enumerate(classes)}
    return {
        "top1": float((pred == y[te]).mean()),
        "balanced_accuracy": float(balanced_accuracy_score(y[te], pred)),
        "per_class_recall": recall,
        "confusion_matrix": cm.tolist(),
        "classes": [str(c) for c in classes],
        "n_reference": int(len(tr)),
        "n_query": int(len(te)),
        "k": k,
        "temperature": temperature,
        "train_fraction": train_fraction,
        "seed": seed,
        "stratified": stratified,
    }


def knn_command(
    cells: str,
    label_key: str,
    k: int = 20,
    temperature: float = 0.07,
    train_fraction: float = 0.8,
    seed: int = 0,
    out: str | None = None,
    reference: str | None = None,
    device: str = "cpu",
) -> dict:
    x, obs = read_embeddings(cells)
    out_dir = Path(out or os.path.join(os.path.dirname(os.path.abspath(cells)), Path(cells).stem + "_knn"))
    out_dir.mkdir(parents=True, exist_ok=True)
    if reference:
        rx, robs = read_embeddings(reference)
        if rx.shape[1] != x.shape[1]:
            raise ConfigError(
                f"{reference}: embeddings of {rx.shape[1]} dims, {cells} has {x.shape[1]}: "
                "embed both with the same model"
            )
        rl = labels_of(robs, label_key, reference)
        keep = rl.notna().to_numpy()
        classes = sorted(set(rl[keep].tolist()), key=str)
        code = {c: i for i, c in enumerate(classes)}
        pred = knn_predict(
            rx[keep],
            np.array([code[v] for v in rl[keep]]),
            x,
            k=k,
            temperature=temperature,
            n_classes=len(classes),
            device=device,
        )
        names = np.array(classes, dtype=object)[pred]
        write_obs_column(cells, f"knn_{label_key}", pd.Categorical(names, categories=classes))
        counts = pd.Series(names).value_counts().to_dict()
        result = {
            "mode": "classify",
            "reference": reference,
            "predicted_counts": {str(a): int(b) for a, b in counts.items()},
            "column": f"knn_{label_key}",
            "k": k,
            "temperature": temperature,
        }
    else:
        lab = labels_of(obs, label_key, cells)
        keep = lab.notna().to_numpy()
        if keep.sum() < 2 or lab[keep].nunique() < 2:
            raise InputError(f"{cells}: column {label_key!r} needs at least two labelled classes")
        result = {
            "mode": "evaluate",
            **evaluate_knn(x[keep], lab[keep].to_numpy(), k, temperature, train_fraction, seed, device),
        }
        from scdino.engine.plots import confusion_png

        confusion_png(
            np.array(result["confusion_matrix"]),
            result["classes"],
            str(out_dir / "confusion.png"),
            f"{Path(cells).name}\nk-NN top-1 {100 * result['top1']:.1f}% (k={k}, T={temperature})",
        )
    result.update(cells=cells, label_key=label_key)
    (out_dir / "knn.json").write_text(json.dumps(result, indent=2))
    result["out"] = str(out_dir)
    return result


def write_obs_column(path: str, name: str, values) -> None:
    """Add or replace the obs column ``name`` of the embeddings store at ``path`` (one value per cell, in order)."""
    import zarr
    from anndata.io import read_elem, write_elem

    from scdino.engine.output import _consolidate

    g = zarr.open_group(path, mode="r+", use_consolidated=False)
    obs = read_elem(g["obs"])
    obs[name] = np.asarray(values) if not isinstance(values, pd.Categorical) else values
    write_elem(g, "obs", obs)
    _consolidate(path)
