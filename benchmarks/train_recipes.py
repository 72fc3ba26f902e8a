"""Which scdino-train recipe learns on real cells? Trains several recipes side by side on the Jurkat training cells
(``benchmarks/data/jurkat_cellcycle/train.zarr``, label-free channels BF+DF) and ranks them by k-NN on the training
cells only (stratified 80/20 splits of them, k=20, T=0.07, 5 seeds); the held-out cells are not read here.

Next to every recipe, on the same splits: raw pixels (each crop min-max scaled per channel) and the untrained network
of the same architecture with each intensity scaling (the gate a shipped model must pass by 5 points).

Three steps, so that the long part can run on a GPU machine that has PyTorch but no zarr:

    python benchmarks/train_recipes.py prepare .gpu                 # training crops + labels -> .gpu/jurkat_train.npz
    python benchmarks/train_recipes.py search .gpu --out OUT [--recipes a,b] [--budget-s 400] [--device cuda]
    python benchmarks/train_recipes.py summary OUT/train_recipes.json   # the table again

``search`` runs every recipe as its own process (all at once on a GPU, one at a time on a CPU), each stopping before
an epoch that would start after the budget; writes ``train_recipes.json`` (settings, trajectories of every epoch,
k-NN table), ``logs.tar.gz`` (config.json, log.jsonl, output of each run) and the best recipes' teacher backbones
(``NAME.pth``, float16 as the package ships them) into OUT. ``--epochs`` and ``--max-iters`` shorten every recipe
for a smoke test.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tarfile
import time
from pathlib import Path

from harness import machine, write_results

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "benchmarks" / "data" / "jurkat_cellcycle"
CHANNELS = ("BF", "DF")
SEEDS = 5

#: the starting recipe for 40 px imaging-flow crops: views that keep the whole cell (large centred locals), any angle,
#: no aspect change, per-channel brightness, light blur, the fixed intensity range of the training cells, a head and a
#: teacher momentum sized for a run of a few thousand steps
BASE: dict = {
    "arch": "vit_tiny",
    "patch": 8,
    "global_size": 40,
    "local_size": 24,
    "local_crops": 4,
    "global_scale": (0.6, 1.0),
    "local_scale": (0.25, 0.5),
    "aspect_ratio": (1.0, 1.0),
    "centre_views": True,
    "rotation": 180.0,
    "flip_p": 0.5,
    "brightness": (0.7, 1.3),
    "brightness_p": 0.8,
    "brightness_per_channel": True,
    "blur_p": (0.5, 0.1, 0.3),
    "blur_sigma": (0.1, 1.0),
    "solarize_p": 0.0,
    "intensity_scaling": "dataset",
    "intensity_percentiles": (0.1, 99.9),
    "out_dim": 4096,
    "head_hidden": 2048,
    "head_bottleneck": 256,
    "drop_path": 0.1,
    "epochs": 200,
    "batch_size_per_device": 128,
    "lr": 1e-3,
    "min_lr": 1e-5,
    "warmup_epochs": 10,
    "weight_decay": 0.04,
    "weight_decay_end": 0.4,
    "momentum_teacher": 0.99,
    "teacher_temp": 0.04,
    "warmup_teacher_temp": 0.04,
    "warmup_teacher_temp_epochs": 0,
    "knn_freq": 20,
    "saveckp_freq": 0,
}

#: recipe name -> changes from BASE (each tests one idea)
RECIPES: dict[str, dict] = {
    "base": {},
    "whole_globals": {"global_scale": (1.0, 1.0)},  # global views never zoom: the cell's size is kept
    "whole_globals_no_locals": {"global_scale": (1.0, 1.0), "local_crops": 0},
    "crop_minmax": {"intensity_scaling": "crop"},  # the paper's per-crop min-max
    "momentum_0996": {"momentum_teacher": 0.996},
    "head_1024": {"out_dim": 1024, "head_hidden": 1024},
    "teacher_temp_07": {"teacher_temp": 0.07, "warmup_teacher_temp_epochs": 30},
    "lr_2e3": {"lr": 2e-3},
    "strong_views": {"global_scale": (0.3, 1.0), "aspect_ratio": (0.75, 1.3333), "centre_views": False},
    "long_500": {"epochs": 500, "warmup_epochs": 20},
    # round 2, after round 1 (benchmarks/results/train_recipes_round1.json): locals and zoom hurt, so two whole-cell
    # global views (rotation, flips, brightness, blur) and a schedule that finishes
    "two_views": {"global_scale": (1.0, 1.0), "local_crops": 0, "epochs": 100},
    "two_views_no_brightness": {"global_scale": (1.0, 1.0), "local_crops": 0, "epochs": 100, "brightness_p": 0.0},
    "two_views_geometry_only": {
        "global_scale": (1.0, 1.0),
        "local_crops": 0,
        "epochs": 100,
        "brightness_p": 0.0,
        "blur_p": (0.0, 0.0, 0.0),
    },
    "two_views_teacher_temp_06": {
        "global_scale": (1.0, 1.0),
        "local_crops": 0,
        "epochs": 100,
        "teacher_temp": 0.06,
        "warmup_teacher_temp_epochs": 30,
    },
    "two_views_slight_zoom": {"global_scale": (0.85, 1.0), "local_crops": 0, "epochs": 100},
    "two_views_lr_5e4": {"global_scale": (1.0, 1.0), "local_crops": 0, "epochs": 100, "lr": 5e-4},
    "two_views_momentum_0996": {"global_scale": (1.0, 1.0), "local_crops": 0, "epochs": 100, "momentum_teacher": 0.996},
    "two_views_patch4": {"global_scale": (1.0, 1.0), "local_crops": 0, "epochs": 100, "patch": 4, "local_size": 24},
    "two_views_200": {"global_scale": (1.0, 1.0), "local_crops": 0, "epochs": 200, "warmup_epochs": 10},
    "two_views_no_drop_path": {"global_scale": (1.0, 1.0), "local_crops": 0, "epochs": 100, "drop_path": 0.0},
}


def _import_scdino() -> None:
    """Import scdino from this checkout when it is not installed (a GPU machine without the package's
    dependencies): the stage folders are subpackages of scdino, as pyproject's package-dir maps them."""
    try:
        import scdino.training.loop
    except ImportError:
        sys.path.insert(0, str(ROOT / "src"))
        import scdino

        scdino.__path__.append(str(ROOT))


def prepare(folder: Path) -> None:
    import numpy as np

    from scdino.cells.cropstore import CropStore

    store = CropStore(DATA / "train.zarr")
    crops = store.array[:]
    labels = store.table()["class"].astype(str).to_numpy()
    folder.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(
        folder / "jurkat_train.npz",
        crops=crops,
        labels=labels.astype("U"),
        channels=np.array(store.channels, dtype="U"),
    )
    print(f"{folder / 'jurkat_train.npz'}: {crops.shape} {crops.dtype}, {len(set(labels))} classes")


def _load(npz: Path):
    import numpy as np

    z = np.load(npz)
    names = [str(c) for c in z["channels"]]
    idx = [names.index(c) for c in CHANNELS]
    return z["crops"][:, idx], z["labels"].astype(str)


def child(name: str, npz: Path, work: Path, deadline: float, device: str, overrides: dict) -> None:
    """Train one recipe into work/NAME; stop before an epoch that would start after ``deadline``."""
    import logging

    import torch

    from scdino.export.package import package_backbone
    from scdino.training import loop
    from scdino.training.config import build_config

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stdout)
    crops, labels = _load(npz)
    opts = {**BASE, **RECIPES[name], **overrides}
    out = work / name
    sets = [f"{k}={','.join(map(str, v)) if isinstance(v, (tuple, list)) else v}" for k, v in opts.items()]
    cfg = build_config(
        None, sets, data=str(npz), out=str(out), device=device, channels=list(CHANNELS), val_data=str(npz)
    )
    t = torch.from_numpy(crops.astype("int32"))
    data = loop.data_from_crops(cfg, t, list(CHANNELS))
    original = loop.train_one_epoch

    def guarded(tr, epoch, logf):
        if time.time() > deadline:
            raise TimeoutError(f"budget reached before epoch {epoch + 1}")
        return original(tr, epoch, logf)

    loop.train_one_epoch = guarded
    try:
        loop.train(cfg, data=data, val=(t, labels) if cfg.knn_freq else None)
        status = "finished"
    except TimeoutError as exc:
        status = str(exc)
    (out / "status.txt").write_text(status)
    if (out / "checkpoint.pth").is_file():
        package_backbone(str(out / "checkpoint.pth"), str(out / "model.pth"), half=True)
        (out / "checkpoint.pth").unlink()  # the full checkpoint (optimizer, student) stays on the machine
    print(f"{name}: {status}")


def _knn(emb, labels) -> tuple[float, float]:
    import numpy as np

    from scdino.knn import evaluate_knn

    r = [evaluate_knn(emb, labels, seed=s) for s in range(SEEDS)]
    return float(np.mean([x["top1"] for x in r])), float(np.mean([x["balanced_accuracy"] for x in r]))


def evaluate(work: Path, names: list[str], npz: Path, device: str) -> list[dict]:
    """k-NN on the training cells of every finished recipe and of the baselines (same splits)."""
    import numpy as np
    import torch

    from scdino.models import embed_crops, load_model
    from scdino.models.vit import VisionTransformer, arch_config
    from scdino.preprocess import Preprocessing

    crops, labels = _load(npz)
    x = crops.astype(np.float32)
    lo, hi = x.min((2, 3), keepdims=True), x.max((2, 3), keepdims=True)
    raw = ((x - lo) / np.maximum(hi - lo, 1e-12)).reshape(len(x), -1)
    rows = [{"recipe": "raw pixels, min-max per crop", **dict(zip(("top1", "balanced"), _knn(raw, labels)))}]
    preps = {}
    for name in names:
        path = work / name / "model.pth"
        if not path.is_file():
            continue
        lm = load_model(str(path), len(CHANNELS))
        emb = embed_crops(lm.model.to(device), crops, lm.prep, torch.device(device))
        top1, bal = _knn(emb, labels)
        log = [json.loads(ln) for ln in (work / name / "log.jsonl").read_text().splitlines()]
        summaries = [r for r in log if r.get("summary")]
        status = (work / name / "status.txt").read_text() if (work / name / "status.txt").is_file() else "?"
        rows.append({"recipe": name, "top1": top1, "balanced": bal, "status": status, "epochs": summaries})
        preps.setdefault(lm.prep.scale_lo is not None, lm.prep)
    torch.manual_seed(0)
    untrained = VisionTransformer(arch_config(f"{BASE['arch']}{BASE['patch']}", len(CHANNELS), BASE["global_size"]))
    for fixed, prep in sorted(preps.items()):
        emb = embed_crops(untrained.to(device), crops, prep, torch.device(device))
        kind = "fixed range" if fixed else "min-max per crop"
        rows.append({"recipe": f"untrained, {kind}", **dict(zip(("top1", "balanced"), _knn(emb, labels)))})
    if not preps:
        emb = embed_crops(untrained.to(device), crops, Preprocessing(BASE["global_size"]), torch.device(device))
        rows.append({"recipe": "untrained, min-max per crop", **dict(zip(("top1", "balanced"), _knn(emb, labels)))})
    return rows


def table(rows: list[dict]) -> str:
    lines = [
        f"k-NN on the Jurkat training cells, BF+DF (mean of {SEEDS} stratified 80/20 splits, k=20, T=0.07)",
        "",
        "| recipe | top-1 | balanced | epochs | teacher entropy first -> last | embedding spread last | status |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in sorted(rows, key=lambda r: -(r["top1"] + r["balanced"])):
        ep = r.get("epochs") or []
        ent = f"{ep[0]['teacher_entropy']:.2f} -> {ep[-1]['teacher_entropy']:.2f}" if ep else ""
        spread = f"{ep[-1]['embedding_spread']:.3f}" if ep else ""
        lines.append(
            f"| {r['recipe']} | {100 * r['top1']:.1f} | {100 * r['balanced']:.1f} | {len(ep) or ''} | {ent} | "
            f"{spread} | {r.get('status', '')} |"
        )
    return "\n".join(lines)


def search(args) -> None:
    import torch

    names = args.recipes.split(",") if args.recipes else list(RECIPES)
    unknown = [n for n in names if n not in RECIPES]
    if unknown:
        sys.exit(f"unknown recipe(s) {unknown}; known: {', '.join(RECIPES)}")
    out = Path(args.out)
    work = Path(args.work) if args.work else out / "work"
    work.mkdir(parents=True, exist_ok=True)
    npz = Path(args.folder) / "jurkat_train.npz"
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    deadline = time.time() + args.budget_s
    overrides = {}
    if args.epochs:
        overrides.update(epochs=args.epochs, warmup_epochs=0, knn_freq=args.epochs)
    if args.max_iters:
        overrides["max_iters_per_epoch"] = args.max_iters
    parallel = device == "cuda"
    t0 = time.time()
    procs = []
    for name in names:
        cmd = [
            sys.executable,
            __file__,
            "child",
            name,
            str(npz),
            str(work),
            str(deadline),
            device,
            json.dumps(overrides),
        ]
        logf = open(work / f"{name}.out", "w")
        p = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"})
        procs.append((name, p))
        if not parallel:
            p.wait()
    for name, p in procs:
        p.wait()
        print(f"{name}: exit {p.returncode} after {time.time() - t0:.0f} s", flush=True)
    rows = evaluate(work, names, npz, device)
    text = table(rows)
    print(text)
    trained = sorted((r for r in rows if "status" in r), key=lambda r: -(r["top1"] + r["balanced"]))
    keep = [r["recipe"] for r in trained[: args.keep]]
    for name in keep:
        os.replace(work / name / "model.pth", out / f"{name}.pth")
    with tarfile.open(out / "logs.tar.gz", "w:gz") as tar:
        for name in names:
            for f in ("config.json", "log.jsonl", "status.txt"):
                if (work / name / f).is_file():
                    tar.add(work / name / f, arcname=f"{name}/{f}")
            if (work / f"{name}.out").is_file():
                tar.add(work / f"{name}.out", arcname=f"{name}/output.txt")
    gpu = torch.cuda.get_device_name(0) if device == "cuda" else None
    res = {
        "benchmark": "train_recipes",
        "data": "benchmarks/data/jurkat_cellcycle/train.zarr (training cells only)",
        "channels": list(CHANNELS),
        "protocol": {"k": 20, "temperature": 0.07, "split": "stratified 80/20 of the training cells", "seeds": SEEDS},
        "base": BASE,
        "recipes": {n: RECIPES[n] for n in names},
        "overrides": overrides,
        "budget_s": args.budget_s,
        "wall_s": time.time() - t0,
        "kept_models": keep,
        "machine": machine(device=device, gpu=gpu),
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
        "results": rows,
    }
    write_results(out / "train_recipes.json", res)
    print(f"wrote {out / 'train_recipes.json'}, logs.tar.gz and {', '.join(f'{k}.pth' for k in keep)}")


def main() -> None:
    _import_scdino()
    if len(sys.argv) > 1 and sys.argv[1] == "child":
        name, npz, work, deadline, device, overrides = sys.argv[2:8]
        child(name, Path(npz), Path(work), float(deadline), device, json.loads(overrides))
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="step", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("folder", type=Path)
    s = sub.add_parser("search")
    s.add_argument("folder", type=Path)
    s.add_argument("--out", required=True)
    s.add_argument("--work", help="run folders (default OUT/work)")
    s.add_argument("--recipes", help="comma-separated names (default: all)")
    s.add_argument("--budget-s", type=float, default=400.0)
    s.add_argument("--device")
    s.add_argument("--keep", type=int, default=4, help="teacher backbones kept, best first")
    s.add_argument("--epochs", type=int, help="smoke test: every recipe this many epochs")
    s.add_argument("--max-iters", type=int, help="smoke test: steps per epoch")
    m = sub.add_parser("summary")
    m.add_argument("json", type=Path)
    args = ap.parse_args()
    if args.step == "prepare":
        prepare(args.folder)
    elif args.step == "search":
        search(args)
    else:
        print(table(json.loads(args.json.read_text())["results"]))


if __name__ == "__main__":
    main()
