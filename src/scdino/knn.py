"""Weighted k-NN classification on embeddings (SPEC section 4, as DINO's ``knn_classifier``), and its evaluation on a
seeded, stratified split; used by the engine's ``knn`` and ``evaluate``, training's k-NN monitor and export's checks.

L2-normalise, cosine similarity, the top k reference neighbours vote with weight exp(sim / T), the class with the
largest summed weight wins. Chunked over queries, so memory is bounded by ``chunk`` x n_reference.
"""

from __future__ import annotations

import numpy as np

from scdino.bounds import Bound, declare
from scdino.errors import ConfigError

#: the paper's protocol (SPEC section 4): neighbours, vote temperature (DINO's), reference share of the split
K = 20
TEMPERATURE = 0.07
TRAIN_FRACTION = 0.8
declare(
    k=Bound("neighbours that vote", low=1, integer=True),
    temperature=Bound("vote temperature of exp(similarity / T)", low=0, low_open=True),
    train_fraction=Bound("share of the labelled cells used as the reference", low=0, high=1, low_open=True,
                         high_open=True),
)  # fmt: skip


def knn_predict(
    reference: np.ndarray,
    ref_labels: np.ndarray,
    query: np.ndarray,
    k: int = K,
    temperature: float = TEMPERATURE,
    n_classes: int | None = None,
    chunk: int = 4096,
    exclude_self: bool = False,
    device: str = "cpu",
) -> np.ndarray:
    """Predicted class codes of ``query`` rows. ``ref_labels`` are integer codes 0..n_classes-1.

    ``exclude_self`` drops the query's own row when ``query`` is ``reference`` (leave-one-out).
    """
    import torch

    ref = torch.nn.functional.normalize(torch.as_tensor(reference, dtype=torch.float32, device=device), dim=1)
    lab = torch.as_tensor(ref_labels, dtype=torch.long, device=device)
    n_classes = int(n_classes if n_classes is not None else int(lab.max()) + 1)
    k = min(k, ref.shape[0] - (1 if exclude_self else 0))
    chunk = max(1, min(chunk, (1 << 27) // max(1, ref.shape[0])))  # similarity block <= 128 M floats (512 MB)
    out = np.empty(len(query), np.int64)
    for a in range(0, len(query), chunk):
        q = torch.nn.functional.normalize(
            torch.as_tensor(query[a : a + chunk], dtype=torch.float32, device=device), dim=1
        )
        sim = q @ ref.T
        if exclude_self:
            idx = torch.arange(a, a + len(q), device=device)
            sim[torch.arange(len(q), device=device), idx] = -float("inf")
        top, nn_idx = sim.topk(k, dim=1)
        votes = torch.zeros(len(q), n_classes, device=device)
        votes.scatter_add_(1, lab[nn_idx], (top / temperature).exp())
        out[a : a + len(q)] = votes.argmax(1).cpu().numpy()
    return out


def split(labels: np.ndarray, train_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray, bool]:
    """Seeded split, stratified by class where every class has at least two cells."""
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(labels))
    n_ref = int(np.floor(train_fraction * len(labels)))  # as scikit-learn rounds a fractional train size
    if n_ref < 1 or n_ref >= len(labels):
        raise ConfigError(
            f"--train-fraction {train_fraction} of {len(labels)} labelled cells leaves {n_ref} reference and "
            f"{len(labels) - n_ref} query cells; pass a fraction that leaves at least one of each"
        )
    _, counts = np.unique(labels, return_counts=True)
    strat = labels if counts.min() >= 2 and len(labels) * (1 - train_fraction) >= len(counts) else None
    tr, te = train_test_split(idx, train_size=train_fraction, random_state=seed, stratify=strat)
    return np.sort(tr), np.sort(te), strat is not None


def evaluate_knn(
    x: np.ndarray,
    labels: np.ndarray,
    k: int = K,
    temperature: float = TEMPERATURE,
    train_fraction: float = TRAIN_FRACTION,
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


def dominant_channel_labels(crops: np.ndarray) -> np.ndarray:
    """A label derived from the pixels: the channel brightest in the crop's centre relative to that channel's
    spread over all crops (e.g. which nuclear marker a neocortex nucleus expresses)."""
    c = crops.astype(np.float64)
    s = c.shape[-1]
    centre = c[..., s // 4 : s - s // 4, s // 4 : s - s // 4].mean(axis=(2, 3))
    lo, hi = np.percentile(centre, 5, axis=0), np.percentile(centre, 95, axis=0)
    return np.argmax((centre - lo) / np.maximum(hi - lo, 1e-9), axis=1)


def labels_of(obs, key: str, path: str):
    """The class column ``key`` of a cell table (a pandas DataFrame) as objects, missing values as None."""
    if key not in obs:
        raise ConfigError(f"{path}: no obs column {key!r}; columns are {', '.join(obs.columns)}; pass --label-key")
    return obs[key].astype("object").where(obs[key].notna(), None)
