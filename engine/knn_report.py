"""``scdino-engine knn``: the paper's k-NN evaluation of an embeddings store, and classification of unlabelled
cells against a labelled reference (SPEC section 4; the vote itself is :func:`scdino.knn.knn_predict`)."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import pandas as pd

from scdino.engine.output import labels_of, read_embeddings, write_obs_column
from scdino.errors import ConfigError, InputError
from scdino.knn import TEMPERATURE, TRAIN_FRACTION, K, evaluate_knn, knn_predict

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
