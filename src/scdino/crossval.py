"""Accuracy with intervals: stratified K-fold cross-validation over every labelled cell, with the paper's weighted
k-NN and a linear probe, and paired bootstrap intervals of the difference between two feature sets on the same cells.

One 80/20 split of a few hundred cells moves by a couple of points from seed to seed, so a single split cannot say
which of two models is better. Here every cell is a query exactly once (its fold's model never saw it), both feature
sets are scored on the same cells with the same folds, and the difference is resampled cell by cell (within each class,
so that every class keeps its count and balanced accuracy stays defined). A comparison is called a win only when the
95% interval of the difference excludes 0.

:func:`holdout_validate` scores a fixed held-out set the same way: the training cells are the reference, every
held-out cell a query once, and the bootstrap resamples the held-out cells.

Used by ``scdino-engine evaluate`` and the benchmarks (``benchmarks/jurkat_cv.py``,
``benchmarks/default_model_knn.py``).
"""

from __future__ import annotations

import numpy as np

from scdino.bounds import Bound, declare
from scdino.errors import ConfigError
from scdino.knn import TEMPERATURE, K, knn_predict

FOLDS = 5
BOOTSTRAP = 2000
declare(
    folds=Bound("folds of the stratified cross-validation; 0: none", low=0, integer=True),
    bootstrap=Bound("bootstrap resamples of the cells for the 95% intervals", low=100, integer=True),
)
LEVEL = 0.95
METHODS = ("knn", "probe")
METRICS = ("top1", "balanced_accuracy")


def parse_merge(spec: str | None) -> dict[str, str]:
    """``"Anaphase,Telophase=late_M;G2,Prophase=G2M"`` as {old class: new class}; empty for None or ""."""
    out: dict[str, str] = {}
    for group in (spec or "").split(";"):
        if not group.strip():
            continue
        if group.count("=") != 1:
            raise ConfigError(
                f"--merge-classes {group!r}: expected CLASS,CLASS=NEW (groups separated by ';'), "
                "e.g. Anaphase,Telophase=late_mitosis"
            )
        names, new = group.split("=")
        for n in names.split(","):
            if n.strip():
                out[n.strip()] = new.strip()
    return out


def merge_labels(labels: np.ndarray, merge: dict[str, str]) -> np.ndarray:
    """Labels with the classes named in ``merge`` replaced by their group; a name no cell has is refused."""
    labels = np.asarray(labels).astype(str)
    unknown = sorted(set(merge) - set(labels.tolist()))
    if unknown:
        raise ConfigError(
            f"--merge-classes names {', '.join(unknown)}, which no cell has; the classes are "
            f"{', '.join(sorted(set(labels.tolist())))}"
        )
    return np.array([merge.get(v, v) for v in labels], dtype=object)


def folds_of(
    y: np.ndarray, folds: int, seed: int, names: list[str] | None = None
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Stratified, shuffled, seeded folds (scikit-learn's ``StratifiedKFold``); refused when a class has fewer cells
    than folds, because that class could not be in every fold's training part."""
    from sklearn.model_selection import StratifiedKFold

    classes, counts = np.unique(y, return_counts=True)
    if folds < 2:
        raise ConfigError(f"--folds {folds}: cross-validation needs at least 2 folds")
    if counts.min() < folds:
        small = ", ".join(f"{names[c] if names else c} ({n})" for c, n in zip(classes, counts) if n < folds)
        raise ConfigError(
            f"{folds}-fold cross-validation needs at least {folds} cells per class; {small} have fewer: pass fewer "
            "--folds or merge those classes (--merge-classes)"
        )
    return list(StratifiedKFold(folds, shuffle=True, random_state=seed).split(np.zeros(len(y)), y))


def probe_model(seed: int = 0):
    """The linear probe: logistic regression on embeddings standardised with the training part's mean and sd."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000, random_state=seed))


#: BLAS threads of a probe fit. The fit is a few hundred small products (cells x features x classes); on a 2-core
#: machine one thread was 2.9x faster than two when idle and 5.1x beside a training run
#: (``benchmarks/probe_threads.py``).
PROBE_THREADS = 1


def probe_threads():
    """A context in which BLAS uses :data:`PROBE_THREADS` threads (threadpoolctl, a scikit-learn dependency)."""
    from threadpoolctl import threadpool_limits

    return threadpool_limits(limits=PROBE_THREADS, user_api="blas")


def oof_predictions(
    x: np.ndarray,
    y: np.ndarray,
    splits: list[tuple[np.ndarray, np.ndarray]],
    method: str,
    k: int = K,
    temperature: float = TEMPERATURE,
    seed: int = 0,
) -> np.ndarray:
    """Out-of-fold predicted class codes: each cell predicted by the model of the fold that held it out."""
    n_classes = int(y.max()) + 1
    pred = np.full(len(y), -1, np.int64)
    for tr, te in splits:
        if method == "knn":
            pred[te] = knn_predict(x[tr], y[tr], x[te], k=k, temperature=temperature, n_classes=n_classes)
        elif method == "probe":
            with probe_threads():
                pred[te] = probe_model(seed).fit(x[tr], y[tr]).predict(x[te])
        else:
            raise ConfigError(f"method {method!r}: expected one of {', '.join(METHODS)}")
    return pred


def metric(y: np.ndarray, pred: np.ndarray, name: str, n_classes: int) -> float:
    """Top-1 (share of cells right) or balanced accuracy (mean over the classes present of each class's recall)."""
    right = pred == y
    if name == "top1":
        return float(right.mean())
    counts = np.bincount(y, minlength=n_classes)
    hits = np.bincount(y, weights=right, minlength=n_classes)
    present = counts > 0
    return float((hits[present] / counts[present]).mean())


def scores(y: np.ndarray, pred: np.ndarray, classes: list[str]) -> dict:
    """Top-1, balanced accuracy and recall per class of one set of predictions."""
    n = len(classes)
    counts = np.bincount(y, minlength=n)
    hits = np.bincount(y, weights=pred == y, minlength=n)
    return {
        "top1": metric(y, pred, "top1", n),
        "balanced_accuracy": metric(y, pred, "balanced_accuracy", n),
        "per_class_recall": {c: float(hits[i] / counts[i]) if counts[i] else None for i, c in enumerate(classes)},
    }


def bootstrap_indices(y: np.ndarray, n_boot: int, seed: int) -> np.ndarray:
    """``n_boot`` resamples of the cells (rows of indices), drawn with replacement within each class."""
    rng = np.random.default_rng(seed)
    out = np.empty((n_boot, len(y)), np.int64)
    pos = 0
    for c in np.unique(y):
        members = np.flatnonzero(y == c)
        out[:, pos : pos + len(members)] = members[rng.integers(0, len(members), size=(n_boot, len(members)))]
        pos += len(members)
    return out


def bootstrap_differences(
    y: np.ndarray, pred_a: np.ndarray, pred_b: np.ndarray, name: str, n_boot: int = BOOTSTRAP, seed: int = 0
) -> np.ndarray:
    """The metric of A minus that of B on each of ``n_boot`` paired resamples (the same cells for both)."""
    n_classes = int(y.max()) + 1
    idx = bootstrap_indices(y, n_boot, seed)
    return np.array([metric(y[i], pred_a[i], name, n_classes) - metric(y[i], pred_b[i], name, n_classes) for i in idx])


def interval(values: np.ndarray, level: float = LEVEL) -> tuple[float, float]:
    """The central percentile interval of a bootstrap distribution."""
    lo, hi = np.percentile(values, [50 * (1 - level), 50 * (1 + level)])
    return float(lo), float(hi)


def verdict(a: str, b: str, lo: float, hi: float) -> str:
    """The verdict: "A beats B" only when the interval of A - B excludes 0."""
    if lo > 0:
        return f"{a} beats {b}"
    if hi < 0:
        return f"{b} beats {a}"
    return "no difference shown"


def paired_comparison(
    y: np.ndarray, pred_a: np.ndarray, pred_b: np.ndarray, a: str, b: str, n_boot: int = BOOTSTRAP, seed: int = 0
) -> dict:
    """A - B in top-1 and balanced accuracy on the same cells, with paired bootstrap intervals and the verdict."""
    n_classes = int(y.max()) + 1
    out = {"a": a, "b": b}
    for name in METRICS:
        lo, hi = interval(bootstrap_differences(y, pred_a, pred_b, name, n_boot, seed))
        diff = metric(y, pred_a, name, n_classes) - metric(y, pred_b, name, n_classes)
        out[name] = {"difference": diff, "low": lo, "high": hi, "verdict": verdict(a, b, lo, hi)}
    return out


def _encoded(labels: np.ndarray, merge: dict[str, str] | None) -> tuple[np.ndarray, list[str]]:
    """Class codes of ``labels`` (after merging) and the class names in code order."""
    names = merge_labels(labels, merge or {})
    classes = sorted(set(names.tolist()), key=str)
    code = {c: i for i, c in enumerate(classes)}
    return np.array([code[v] for v in names], np.int64), [str(c) for c in classes]


def _check_rows(features: dict[str, np.ndarray], n: int, what: str) -> None:
    for name, x in features.items():
        if len(x) != n:
            raise ConfigError(f"feature set {name!r} has {len(x)} rows for {n} labelled {what}")


def _scored(
    out: dict, y: np.ndarray, preds: dict[str, dict[str, np.ndarray]], pairs: list[tuple[str, str]], seed: int
) -> dict:
    """Fill ``out`` with the scores (each with its bootstrap interval) and the paired comparisons of the predictions
    ``preds`` ({method: {features: class codes}}) of the cells ``y``."""
    n_boot, n_classes = out["bootstrap"], len(out["classes"])
    idx = bootstrap_indices(y, n_boot, seed)
    for method, per in preds.items():
        out["predictions"][method] = {n: p.tolist() for n, p in per.items()}
        out["scores"][method] = {}
        for n, p in per.items():
            s = scores(y, p, out["classes"])
            for m in METRICS:
                s[f"{m}_interval"] = interval(np.array([metric(y[i], p[i], m, n_classes) for i in idx]))
            out["scores"][method][n] = s
        out["comparisons"][method] = [paired_comparison(y, per[a], per[b], a, b, n_boot, seed) for a, b in pairs]
    return out


def _header(classes: list[str], y: np.ndarray, folds, seed, methods, k, temperature, n_boot, merge) -> dict:
    return {
        "classes": classes,
        "class_counts": {c: int((y == i).sum()) for i, c in enumerate(classes)},
        "n_cells": int(len(y)),
        "folds": folds,
        "seed": seed,
        "k": k,
        "temperature": temperature,
        "bootstrap": n_boot,
        "level": LEVEL,
        "merged": dict(merge or {}),
        "methods": list(methods),
        "scores": {},
        "comparisons": {},
        "predictions": {},
    }


def cross_validate(
    features: dict[str, np.ndarray],
    labels: np.ndarray,
    *,
    folds: int = FOLDS,
    seed: int = 0,
    methods: tuple[str, ...] = METHODS,
    k: int = K,
    temperature: float = TEMPERATURE,
    n_boot: int = BOOTSTRAP,
    merge: dict[str, str] | None = None,
    pairs: list[tuple[str, str]] | None = None,
) -> dict:
    """Every feature set (same cells, same order) scored by every method with the same folds, each score with a
    bootstrap interval, and the paired comparisons ``pairs`` (default: the first feature set against each other).

    Returns {"classes", "n_cells", "folds", "seed", "methods", "scores": {method: {features: {...}}},
    "comparisons": {method: [paired_comparison ...]}, "predictions": {method: {features: codes}}}.
    """
    y, classes = _encoded(labels, merge)
    splits = folds_of(y, folds, seed, classes)
    names = list(features)
    _check_rows(features, len(y), "cells")
    pairs = pairs if pairs is not None else [(names[0], b) for b in names[1:]]
    out = _header(classes, y, folds, seed, methods, k, temperature, n_boot, merge)
    preds = {m: {n: oof_predictions(features[n], y, splits, m, k, temperature, seed) for n in names} for m in methods}
    return _scored(out, y, preds, pairs, seed)


def holdout_validate(
    train: dict[str, np.ndarray],
    train_labels: np.ndarray,
    test: dict[str, np.ndarray],
    test_labels: np.ndarray,
    *,
    seed: int = 0,
    methods: tuple[str, ...] = METHODS,
    k: int = K,
    temperature: float = TEMPERATURE,
    n_boot: int = BOOTSTRAP,
    merge: dict[str, str] | None = None,
    pairs: list[tuple[str, str]] | None = None,
) -> dict:
    """Train -> held-out: every feature set's k-NN reference (or probe) is the training cells, every held-out cell is
    a query once; scores, intervals and paired comparisons as :func:`cross_validate`, over the held-out cells only
    (the bootstrap resamples them within each class). ``train`` and ``test`` name the same feature sets.

    Returns the layout of :func:`cross_validate`, with ``folds`` "held-out", ``n_cells`` the held-out cells and
    ``n_train`` the reference cells.
    """
    if list(train) != list(test):
        raise ConfigError(f"training features {list(train)} and held-out features {list(test)} differ")
    codes, classes = _encoded(np.concatenate([np.asarray(train_labels), np.asarray(test_labels)]), merge)
    y_tr, y = codes[: len(train_labels)], codes[len(train_labels) :]
    unseen = sorted(set(y.tolist()) - set(y_tr.tolist()))
    if unseen:  # no reference cell could vote for them: their recall would be 0 by construction
        raise ConfigError(
            f"held-out classes {', '.join(classes[c] for c in unseen)} have no training cells, so nothing can predict "
            "them; merge each into a class the training cells have (--merge-classes OLD=NEW) or leave those cells out"
        )
    _check_rows(train, len(y_tr), "training cells")
    _check_rows(test, len(y), "held-out cells")
    names = list(train)
    pairs = pairs if pairs is not None else [(names[0], b) for b in names[1:]]
    out = _header(classes, y, "held-out", seed, methods, k, temperature, n_boot, merge)
    out["n_train"] = int(len(y_tr))
    preds: dict[str, dict[str, np.ndarray]] = {}
    for m in methods:
        preds[m] = {}
        for n in names:
            x = np.concatenate([train[n], test[n]])
            split = [(np.arange(len(y_tr)), np.arange(len(y_tr), len(x)))]
            preds[m][n] = oof_predictions(x, codes, split, m, k, temperature, seed)[len(y_tr) :]
    return _scored(out, y, preds, pairs, seed)


def difference_text(d: dict) -> str:
    """One metric of a :func:`paired_comparison` in points: ``+2.1 [-0.4, +4.6]``."""
    return f"{100 * d['difference']:+.1f} [{100 * d['low']:+.1f}, {100 * d['high']:+.1f}]"


def report_lines(cv: dict) -> list[str]:
    """Markdown tables of a :func:`cross_validate` or :func:`holdout_validate` result: scores with intervals, then
    the paired differences."""
    pct = lambda v: f"{100 * v:.1f}"  # noqa: E731
    how = (
        f"Training cells ({cv['n_train']}) as reference, each of the {cv['n_cells']} held-out cells a query once"
        if cv["folds"] == "held-out"
        else f"{cv['folds']}-fold stratified cross-validation over all {cv['n_cells']} labelled cells "
        f"(seed {cv['seed']})"
    )
    lines = [
        f"{how}; "
        f"95% intervals from {cv['bootstrap']} bootstrap resamples of the cells within each class; k-NN k={cv['k']}, "
        f"T={cv['temperature']}; linear probe: logistic regression on standardised features."
        + (f" Merged classes: {', '.join(f'{a}->{b}' for a, b in cv['merged'].items())}." if cv["merged"] else ""),
        "",
        "| method | features | top-1 [95% CI] | balanced [95% CI] | " + " | ".join(cv["classes"]) + " |",
        "|---|---|---|---|" + "---|" * len(cv["classes"]),
    ]
    for method, per in cv["scores"].items():
        for name, s in per.items():
            (tl, th), (bl, bh) = s["top1_interval"], s["balanced_accuracy_interval"]
            rec = " | ".join("-" if v is None else pct(v) for v in s["per_class_recall"].values())
            lines.append(
                f"| {method} | {name} | {pct(s['top1'])} [{pct(tl)}, {pct(th)}] | "
                f"{pct(s['balanced_accuracy'])} [{pct(bl)}, {pct(bh)}] | {rec} |"
            )
    lines += [
        "",
        "| method | A - B | top-1 difference [95% CI] | balanced difference [95% CI] | verdict (top-1; balanced) |",
    ]
    lines.append("|---|---|---|---|---|")
    for method, comps in cv["comparisons"].items():
        for c in comps:
            t, b = c["top1"], c["balanced_accuracy"]
            lines.append(
                f"| {method} | {c['a']} - {c['b']} | {difference_text(t)} | {difference_text(b)} | "
                f"{t['verdict']}; {b['verdict']} |"
            )
    return lines
