"""The ship gate on real cells, for several training seeds of one recipe: does a model trained on the Jurkat training
cells beat its untrained twin, with intervals, and does its embedding keep the cell's size?

Give it the run folders of one recipe trained with different seeds (``scdino-train --set seed=N``). For each run the
untrained twin is the run's own starting network: its config rebuilt and the networks made exactly as training makes
them (``training.loop.build_networks`` after the run's seed), with the trained checkpoint's fixed intensity range. So
the difference between the two is what training changed, nothing else.

Two stages, so that the held-out cells are embedded once, at the end, after every choice was made:

- ``choose`` (training cells only, 2,064 cells): 5-fold stratified cross-validation of each seed's model, its twin
  and raw pixels (each crop min-max scaled per channel, flattened) with the weighted k-NN (k=20, T=0.07) and a linear
  probe (logistic regression on standardised features); 95% intervals from a bootstrap of the cells within each
  class; paired differences model - twin and model - raw pixels. Plus the **size probe**: how well a ridge regression
  on each feature set predicts the log area of the cell (a mask of the brightfield image: its deviation from the
  background, Otsu threshold, holes filled, the component at the centre) and of its nucleus (Otsu on the DNA
  channel, which the models never see), as cross-validated R^2 with a bootstrap interval.
- ``holdout``: the training cells as reference, each of the 516 held-out cells a query once
  (:func:`scdino.crossval.holdout_validate`); the same tables, and the gate per seed: a model passes when it beats its
  twin by at least 5 points of top-1 and of balanced accuracy with both 95% lower bounds above 0 (k-NN, the paper's
  protocol; the probe is reported beside it).

Across seeds: the mean and sd of each difference, so that one lucky seed is visible as such.

    python benchmarks/jurkat_gate.py choose RUN [RUN ...] [--out benchmarks/results/jurkat_gate_choose.json]
    python benchmarks/jurkat_gate.py holdout RUN [RUN ...] [--merge-classes ...] [--out ...holdout.json]

A RUN is a ``scdino-train --out`` folder (its ``checkpoint.pth`` and ``config.json``) or a folder
``benchmarks/train_recipes.py search`` keeps (``model.pth`` and ``config.json``); the folders' names label the rows.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from harness import write_results
from train_recipes import mean_sd, run_model, twin_of

DATA = Path(__file__).parent / "data" / "jurkat_cellcycle"
RESULTS = Path(__file__).parent / "results"
CHANNELS = ("BF", "DF")
GATE = 0.05  # points of top-1 and of balanced accuracy a model must gain over its untrained twin


def cell_area(bf: np.ndarray) -> int:
    """Pixels of the cell in one brightfield crop: the smoothed absolute deviation from the background (the median of
    the crop's border), Otsu-thresholded, holes filled, the connected component at the centre (else the largest)."""
    from scipy import ndimage as ndi
    from skimage.filters import gaussian, threshold_otsu
    from skimage.measure import label

    bf = bf.astype(np.float64)
    border = np.concatenate([bf[0], bf[-1], bf[1:-1, 0], bf[1:-1, -1]])
    dev = gaussian(np.abs(bf - np.median(border)), sigma=1.0)
    lab = label(ndi.binary_fill_holes(dev > threshold_otsu(dev)))
    if lab.max() == 0:
        return 0
    centre = lab[lab.shape[0] // 2, lab.shape[1] // 2]
    keep = centre if centre else int(np.argmax(np.bincount(lab.ravel())[1:]) + 1)
    return int((lab == keep).sum())


def nucleus_area(dna: np.ndarray) -> int:
    """Pixels above the Otsu threshold of the smoothed DNA channel, holes filled."""
    from scipy import ndimage as ndi
    from skimage.filters import gaussian, threshold_otsu

    d = gaussian(dna.astype(np.float64), sigma=1.0)
    return int(ndi.binary_fill_holes(d > threshold_otsu(d)).sum())


def load(store: str, areas: bool) -> dict:
    """The crops of ``CHANNELS`` and the classes of one store; with ``areas``, each cell's and nucleus's area."""
    from scdino.cells.cropstore import CropStore

    s = CropStore(DATA / f"{store}.zarr")
    crops = s.array[:]
    out = {
        "crops": crops[:, [s.channels.index(c) for c in CHANNELS]],
        "labels": s.table()["class"].astype(str).to_numpy(),
    }
    if areas:
        bf, dna = s.channels.index("BF"), s.channels.index("DNA")
        out["cell_area"] = np.array([cell_area(c[bf]) for c in crops])
        out["nucleus_area"] = np.array([nucleus_area(c[dna]) for c in crops])
    return out


def embed(model: str, crops: np.ndarray) -> np.ndarray:
    from scdino.models import embed_crops, load_model

    lm = load_model(model, len(CHANNELS))
    return embed_crops(lm.model, crops, lm.prep)


def size_probe(features: dict[str, np.ndarray], target: np.ndarray, n_boot: int, seed: int = 0) -> dict:
    """Cross-validated R^2 (5 folds) of a ridge regression (alpha chosen inside each fold) of ``target`` on each
    standardised feature set, with a bootstrap interval over the cells."""
    from sklearn.linear_model import RidgeCV
    from sklearn.metrics import r2_score
    from sklearn.model_selection import KFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from scdino.crossval import interval

    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(target), size=(n_boot, len(target)))
    out = {}
    for name, x in features.items():
        model = make_pipeline(StandardScaler(), RidgeCV(alphas=np.logspace(-2, 4, 13)))
        pred = cross_val_predict(model, x, target, cv=KFold(5, shuffle=True, random_state=seed))
        r2 = float(r2_score(target, pred))
        out[name] = {"r2": r2, "interval": interval(np.array([r2_score(target[i], pred[i]) for i in idx]))}
    return out


def seed_summary(cv: dict, runs: list[str], method: str) -> dict:
    """Mean and sd over the seeds of model - twin and model - raw pixels."""
    out = {}
    for vs, against in (("untrained twin", lambda r: f"untrained twin {r}"), ("raw pixels", lambda r: "raw pixels")):
        comps = [_comparison(cv, method, f"trained {r}", against(r)) for r in runs]
        for m in ("top1", "balanced_accuracy"):
            out[f"{vs} {m}"] = mean_sd([c[m]["difference"] for c in comps])
    return out


def _comparison(cv: dict, method: str, a: str, b: str) -> dict:
    return next(c for c in cv["comparisons"][method] if (c["a"], c["b"]) == (a, b))


def gate(cv: dict, runs: list[str], method: str = "knn") -> list[dict]:
    """Per seed: the model - twin differences and whether they pass the ship gate."""
    rows = []
    for r in runs:
        c = _comparison(cv, method, f"trained {r}", f"untrained twin {r}")
        t, b = c["top1"], c["balanced_accuracy"]
        ok = t["difference"] >= GATE and b["difference"] >= GATE and t["low"] > 0 and b["low"] > 0
        rows.append({"run": r, "method": method, "top1": t, "balanced_accuracy": b, "passes": bool(ok)})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("stage", choices=("choose", "holdout"))
    ap.add_argument("runs", nargs="+", type=Path, help="scdino-train run folders of one recipe, one per seed")
    ap.add_argument("--bootstrap", type=int, default=2000)
    ap.add_argument(
        "--merge-classes",
        help="score merged classes, e.g. 'Anaphase,Metaphase,Telophase=mitosis' (the held-out set has 3 Anaphase and "
        "4 Telophase cells: one of them moves balanced accuracy by about 5 points)",
    )
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    import tempfile

    from scdino.crossval import cross_validate, difference_text, holdout_validate, parse_merge, report_lines
    from scdino.engine.evaluate import raw_pixel_features

    merge = parse_merge(args.merge_classes)
    t0 = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="scdino-jurkat-gate-"))
    train = load("train", areas=args.stage == "choose")
    held = load("holdout", areas=False) if args.stage == "holdout" else None
    names = [r.name for r in args.runs]
    if len(set(names)) < len(names):
        ap.error(f"run folders need distinct names (they label the rows): {', '.join(map(str, args.runs))}")
    models, twins, settings = {}, {}, {}
    for run in args.runs:
        twins[run.name], settings[run.name] = twin_of(run, work)
        models[run.name] = str(run_model(run))
    seeds = [v["seed"] for v in settings.values()]
    if len(set(seeds)) < len(seeds):
        ap.error(f"the runs repeat a training seed ({seeds}); give one run per seed")
    feats = {}  # name -> (training cells, held-out cells or None)
    for r in names:
        for kind, path in (("trained", models[r]), ("untrained twin", twins[r])):
            feats[f"{kind} {r}"] = tuple(embed(path, d["crops"]) if d else None for d in (train, held))
    feats["raw pixels"] = tuple(raw_pixel_features(d["crops"]) if d else None for d in (train, held))
    pairs = [(f"trained {r}", f"untrained twin {r}") for r in names] + [(f"trained {r}", "raw pixels") for r in names]
    lines = [f"Jurkat cells, channels {'+'.join(CHANNELS)}, runs: {', '.join(names)}", ""]
    res: dict = {"benchmark": f"jurkat_gate {args.stage}", "channels": list(CHANNELS), "runs": settings}
    if args.stage == "choose":
        cv = cross_validate(
            {k: v[0] for k, v in feats.items()}, train["labels"], n_boot=args.bootstrap, pairs=pairs, merge=merge
        )
        sizes = {
            t: size_probe({k: v[0] for k, v in feats.items()}, np.log(np.maximum(train[t], 1)), args.bootstrap)
            for t in ("cell_area", "nucleus_area")
        }
        res["size_probe"] = sizes
        lines += ["Training cells only:", ""]
    else:
        cv = holdout_validate(
            {k: v[0] for k, v in feats.items()},
            train["labels"],
            {k: v[1] for k, v in feats.items()},
            held["labels"],
            n_boot=args.bootstrap,
            pairs=pairs,
            merge=merge,
        )
        res["gate"] = {m: gate(cv, names, m) for m in ("knn", "probe")}
    cv.pop("predictions")
    res["cv"] = cv
    res["across_seeds"] = {m: seed_summary(cv, names, m) for m in ("knn", "probe")}
    lines += report_lines(cv)
    if "size_probe" in res:
        lines += ["", "Size probe: cross-validated R^2 of log area from each feature set [95% interval]", ""]
        lines += ["| features | cell area (brightfield) | nucleus area (DNA, never seen) |", "|---|---|---|"]
        for k in feats:
            c, n = res["size_probe"]["cell_area"][k], res["size_probe"]["nucleus_area"][k]
            lines.append(
                f"| {k} | {c['r2']:.3f} [{c['interval'][0]:.3f}, {c['interval'][1]:.3f}] | "
                f"{n['r2']:.3f} [{n['interval'][0]:.3f}, {n['interval'][1]:.3f}] |"
            )
    lines += ["", "Across seeds (mean, sd of the per-seed differences, points):", ""]
    for m, per in res["across_seeds"].items():
        for k, v in per.items():
            sd = f", sd {100 * v['sd']:.1f}" if v["sd"] is not None else ""
            lines.append(f"- {m}, trained - {k}: mean {100 * v['mean']:+.1f}{sd} over {v['n']} seeds")
    if "gate" in res:
        lines += ["", f"Ship gate (>= {100 * GATE:.0f} points over the twin, both lower bounds above 0):", ""]
        for m, rows in res["gate"].items():
            for g in rows:
                t, b = g["top1"], g["balanced_accuracy"]
                lines.append(
                    f"- {m}{'' if m == 'knn' else ' (beside the gate, not the gate)'}, {g['run']}: top-1 "
                    f"{difference_text(t)}, balanced {difference_text(b)}: {'passes' if g['passes'] else 'fails'}"
                )
    res["seconds"] = time.perf_counter() - t0
    text = "\n".join(lines)
    print(text)
    out = args.out or RESULTS / f"jurkat_gate_{args.stage}.json"
    write_results(out, res)
    out.with_suffix(".md").write_text(text + "\n")
    print(f"\nwrote {out} and {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
