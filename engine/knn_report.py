"""``scdino-engine knn``: the paper's k-NN evaluation of an embeddings store, and classification of unlabelled
cells against a labelled reference (SPEC section 4; the vote itself is :func:`scdino.knn.knn_predict`)."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import pandas as pd

from scdino.bounds import check
from scdino.engine.output import read_embeddings, write_obs_column
from scdino.errors import ConfigError, InputError
from scdino.knn import TEMPERATURE, TRAIN_FRACTION, K, evaluate_knn, knn_predict, labels_of
from scdino.outputs import claimed_dir

log = logging.getLogger(__name__)


def knn_command(
    cells: str,
    label_key: str,
    k: int = K,
    temperature: float = TEMPERATURE,
    train_fraction: float = TRAIN_FRACTION,
    seed: int = 0,
    out: str | None = None,
    reference: str | None = None,
    device: str = "cpu",
) -> dict:
    """k-NN accuracy of ``cells`` on its own ``label_key`` (report with a confusion matrix), or, with ``reference``,
    classification of every cell against that labelled store (obs column ``knn_<label_key>``)."""
    check(k=k, temperature=temperature, train_fraction=train_fraction, seed=seed)
    x, obs = read_embeddings(cells)
    out_dir = Path(out or os.path.join(os.path.dirname(os.path.abspath(cells)), Path(cells).stem + "_knn"))
    with claimed_dir(out_dir, "scdino-engine knn", inputs=[cells, reference]):
        if reference:
            result = classify(cells, x, reference, label_key, k, temperature, device)
        else:
            result = accuracy(cells, x, obs, label_key, k, temperature, train_fraction, seed, device, out_dir)
        result.update(cells=cells, label_key=label_key)
        (out_dir / "knn.json").write_text(json.dumps(result, indent=2))
    result["out"] = str(out_dir)
    return result


def classify(
    cells: str, x: np.ndarray, reference: str, label_key: str, k: int, temperature: float, device: str
) -> dict:
    """Label every cell of ``cells`` (embeddings ``x``) by a k-NN vote among the labelled cells of ``reference``."""
    rx, robs = read_embeddings(reference)
    if rx.shape[1] != x.shape[1]:
        raise ConfigError(
            f"{reference}: embeddings of {rx.shape[1]} dims, {cells} has {x.shape[1]}: embed both with the same model"
        )
    rl = labels_of(robs, label_key, reference)
    keep = rl.notna().to_numpy()
    classes = sorted(set(rl[keep].tolist()), key=str)
    code = {c: i for i, c in enumerate(classes)}
    ref_codes = np.array([code[v] for v in rl[keep]])
    pred = knn_predict(rx[keep], ref_codes, x, k=k, temperature=temperature, n_classes=len(classes), device=device)
    names = np.array(classes, dtype=object)[pred]
    write_obs_column(cells, f"knn_{label_key}", pd.Categorical(names, categories=classes))
    counts = pd.Series(names).value_counts().to_dict()
    return {
        "mode": "classify",
        "reference": reference,
        "predicted_counts": {str(a): int(b) for a, b in counts.items()},
        "column": f"knn_{label_key}",
        "k": k,
        "temperature": temperature,
    }


def accuracy(
    cells: str,
    x: np.ndarray,
    obs: pd.DataFrame,
    label_key: str,
    k: int,
    temperature: float,
    train_fraction: float,
    seed: int,
    device: str,
    out_dir: Path,
) -> dict:
    """The paper's k-NN evaluation of the labelled cells of a store, with ``confusion.png`` in ``out_dir``."""
    from scdino.engine.plots import confusion_png

    lab = labels_of(obs, label_key, cells)
    keep = lab.notna().to_numpy()
    if keep.sum() < 2 or lab[keep].nunique() < 2:
        raise InputError(f"{cells}: column {label_key!r} needs at least two labelled classes")
    r = {
        "mode": "evaluate",
        **evaluate_knn(x[keep], lab[keep].to_numpy(), k, temperature, train_fraction, seed, device),
    }
    title = f"{Path(cells).name}\nk-NN top-1 {100 * r['top1']:.1f}% (k={k}, T={temperature})"
    confusion_png(np.array(r["confusion_matrix"]), r["classes"], str(out_dir / "confusion.png"), title)
    return r
