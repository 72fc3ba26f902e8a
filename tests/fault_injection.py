"""Fault injection: every command that writes, pointed at what it must never delete, and every bad input the README
and the issues list, run as a user runs them; each must end in one line naming the place and the fix, exit code 2, with
nothing deleted and nothing marked complete.

    python tests/fault_injection.py            # prints the table (input, exit code, message, files before/after)

docs/faults.md holds its output (WS stands for the workspace the cases run in).

``tests/test_faults.py`` runs the same cases and asserts them.
"""

from __future__ import annotations

import builtins
import errno
import hashlib
import io
import os
import shutil
import sys
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, ContextManager, Iterator
from unittest import mock

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))


@dataclass
class Case:
    name: str
    #: (tool, args) with {ws} standing for the workspace
    tool: str
    args: list[str]
    #: words the one error line must hold
    words: tuple[str, ...]
    #: paths (relative to the workspace) whose contents must be the same before and after
    keep: tuple[str, ...] = ()
    #: run before the command (breaks something in the workspace copy the case uses)
    setup: Callable[[Path], None] | None = None
    #: refused before any work: no cluster is started and nothing new appears in the workspace
    before_work: bool = False
    #: a fault in effect while the command runs (a disk that fills up, a read-only location), given the workspace
    during: Callable[[Path], ContextManager] | None = None
    #: folder (relative to the workspace) that must hold nothing afterwards: no partial file, no empty folder
    empty: str | None = None


@dataclass
class Outcome:
    case: Case
    code: int
    stderr: str
    errors: list[str]
    before: dict[str, str] = field(default_factory=dict)
    after: dict[str, str] = field(default_factory=dict)
    #: workspace entries the command left that were not there before
    new: list[str] = field(default_factory=list)
    #: what the command left in the case's ``empty`` folder (partial files, empty folders)
    left: list[str] = field(default_factory=list)

    @property
    def kept(self) -> bool:
        return self.before == self.after and not self.left


def fingerprint(path: Path) -> str:
    """Files and their contents under ``path`` (or of the file): equal before and after means nothing was lost."""
    if not path.exists():
        return "missing"
    h = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for f in files:
        h.update(str(f.relative_to(path.parent)).encode())
        h.update(f.read_bytes())
    return f"{len(files)} files {h.hexdigest()[:10]}"


def make_workspace(ws: Path) -> Path:
    """A plate, a TIFF folder, a crop store, a finished run, a checkpoint, an ONNX export, a user's folder and file."""
    import torch

    from conftest import dino_full_checkpoint, make_tiny_plate, write_class_tiffs
    from scdino.data import packaged_crops
    from scdino.engine.ingest import ingest
    from scdino.engine.pipeline import RunConfig, run
    from scdino.export.onnx_export import export_onnx
    from scdino.knn import dominant_channel_labels
    from scdino.models import arch_config, build_model

    ws.mkdir(parents=True, exist_ok=True)
    make_tiny_plate(ws / "plate.zarr")
    crops = packaged_crops()[:24, :, 8:40, 8:40]
    write_class_tiffs(ws / "tiffs", crops, [f"m{lab}" for lab in dominant_channel_labels(crops)])
    ingest(ws / "tiffs", ws / "crops.zarr", channels=["CTIP2", "BRN2", "ROR"], progress=False)
    run(
        RunConfig(
            plate=str(ws / "crops.zarr"),
            out=str(ws / "cells.zarr"),
            model="random:vit_test16",
            input_size=32,
            progress=False,
        )
    )
    dino_full_checkpoint(ws / "ck.pth", arch="vit_test16", in_chans=3)
    export_onnx("random:vit_test16", ws / "m.onnx", n_channels=3, crop_size=32, input_size=32)
    torch.save(build_model(arch_config("vit_test8", in_chans=5)).state_dict(), ws / "five.pth")
    (ws / "precious").mkdir()
    (ws / "precious" / "notes.txt").write_text("a user's notes")
    (ws / "plain.txt").write_text("a user's file")
    (ws / "photo.png").write_bytes(b"\x89PNG not scdino's")
    (ws / "text.pth").write_text("just some text, not a checkpoint")
    import pandas as pd

    prof = pd.DataFrame(np.random.default_rng(0).normal(size=(6, 4)), columns=[f"scdino_{i:04d}" for i in range(4)])
    prof.insert(0, "Metadata_treatment", ["a", "a", "b", "b", "c", "c"])
    prof.to_parquet(ws / "profiles.parquet")
    (ws / "user_profiles.csv").write_text("Metadata_Plate,Metadata_Well,Cells_AreaShape_Area\np,A01,120\n")
    (ws / "cfg").mkdir()
    (ws / "cfg" / "model.json").write_text('{"a user\'s": "settings"}')
    return ws


ALL = (
    "precious",
    "plain.txt",
    "photo.png",
    "plate.zarr",
    "tiffs",
    "crops.zarr",
    "cells.zarr",
    "ck.pth",
    "m.onnx",
    "profiles.parquet",
)

#: every writer: (name, tool, args with OUT standing for the output, its input relative to the workspace, --overwrite)
WRITERS = [
    (
        "run",
        "engine",
        ["run", "{ws}/crops.zarr", "--model", "random:vit_test16", "--input-size", "32", "--out", "OUT"],
        "crops.zarr",
        True,
    ),
    ("ingest", "engine", ["ingest", "{ws}/tiffs", "OUT", "--channels", "A,B,C"], "tiffs", True),
    ("sample-plate", "engine", ["sample-plate", "OUT"], None, True),
    ("knn", "engine", ["knn", "{ws}/cells.zarr", "--label-key", "class", "--out", "OUT"], "cells.zarr", False),
    ("umap", "engine", ["umap", "{ws}/cells.zarr", "--png", "OUT"], "cells.zarr", False),
    (
        "evaluate",
        "engine",
        ["evaluate", "{ws}/crops.zarr", "--models", "random:vit_test16", "--input-size", "32", "--out", "OUT"],
        "crops.zarr",
        False,
    ),
    (
        "attention",
        "engine",
        ["attention", "{ws}/crops.zarr", "--model", "random:vit_test16", "--input-size", "32", "--out", "OUT"],
        "crops.zarr",
        False,
    ),
    (
        "export onnx",
        "export",
        ["onnx", "{ws}/ck.pth", "--n-channels", "3", "--crop-size", "32", "--out", "OUT"],
        "ck.pth",
        False,
    ),
    ("quantize", "export", ["quantize", "{ws}/m.onnx", "--out", "OUT"], "m.onnx", False),
    ("backbone", "export", ["backbone", "{ws}/ck.pth", "--out", "OUT"], "ck.pth", False),
    (
        "train",
        "train",
        ["--data", "{ws}/crops.zarr", "--arch", "vit_test", "--patch", "8", "--epochs", "1", "--out", "OUT"],
        "crops.zarr",
        False,
    ),
    ("profiles", "engine", ["profiles", "{ws}/cells.zarr", "--out", "OUT"], "cells.zarr", False),
    ("export-cells", "engine", ["export-cells", "{ws}/cells.zarr", "--out", "OUT"], "cells.zarr", False),
    ("plate-view", "engine", ["plate-view", "{ws}/cells.zarr", "--out", "OUT"], "cells.zarr", False),
    (
        "replicates",
        "engine",
        ["replicates", "{ws}/profiles.parquet", "--key", "treatment", "--out", "OUT"],
        "profiles.parquet",
        False,
    ),
]
FILE_WRITERS = {"umap", "export onnx", "quantize", "backbone", "profiles", "export-cells", "replicates"}


def writer_cases() -> list[Case]:
    """Each writer pointed at a user's folder, a user's file, its own input and the folder that holds its input."""
    cases = []
    for name, tool, args, inp, overwrite in WRITERS:
        extra = ["--overwrite"] if overwrite else []
        targets = [
            (
                "a user's folder",
                "{ws}/precious",
                ("precious",),
                ("not written by scdino",) if name not in FILE_WRITERS else ("is a folder",),
            ),
            ("a user's file", "{ws}/plain.txt", ("plain.txt",), ("plain.txt",)),
        ]
        if name == "umap":
            targets.append(("a user's PNG", "{ws}/photo.png", ("photo.png",), ("not written by scdino",)))
        if inp:
            targets += [
                ("its input", "{ws}/" + inp, (inp,), ("is the input",)),
                ("the input's folder", "{ws}", ALL, ("holds the input",)),
                ("a path inside its input", "{ws}/" + inp + "/inner", (inp,), ("inside the input",)),
            ]
        for what, out, keep, words in targets:
            a = [out if x == "OUT" else x for x in args] + extra
            cases.append(Case(f"{name} -> {what}", tool, a, words, keep))
    return cases


def _delete_field(ws: Path) -> None:
    shutil.rmtree(ws / "plate.zarr" / "A" / "1" / "1")


def _corrupt_chunk(ws: Path) -> None:
    chunk = next((ws / "plate.zarr" / "B" / "2" / "0" / "s0").rglob("c/*/*/*"))
    chunk.write_bytes(b"\x00" * 10)


TINY_TRAINING = [
    "global_size=32",
    "local_size=16",
    "local_crops=2",
    "out_dim=64",
    "head_hidden=32",
    "head_bottleneck=16",
    "saveckp_freq=1",
    "drop_path=0.0",
]
TRAIN = [
    "--data",
    "{ws}/crops.zarr",
    "--arch",
    "vit_test",
    "--patch",
    "8",
    "--batch-size-per-device",
    "8",
    *[a for s in TINY_TRAINING for a in ("--set", s)],
]


def _train_run(ws: Path) -> None:
    from scdino.training.config import build_config
    from scdino.training.loop import train

    train(
        build_config(
            None,
            TINY_TRAINING,
            data=str(ws / "crops.zarr"),
            out=str(ws / "trainrun"),
            arch="vit_test",
            patch=8,
            epochs=1,
            batch_size_per_device=8,
            device="cpu",
        )
    )


def _truncated_run(ws: Path) -> None:
    run = ws / "trainrun"
    _train_run(ws)
    data = (run / "checkpoint.pth").read_bytes()
    (run / "checkpoint.pth").write_bytes(data[: len(data) // 3])


RUN = ["run", "{ws}/plate.zarr", "--model", "random:vit_test8", "--input-size", "32", "--crop-size", "16"]


def input_cases() -> list[Case]:
    """Bad inputs: what a user gets wrong, and damaged data."""
    return [
        Case(
            "not a plate",
            "engine",
            ["run", "{ws}/precious", "--out", "{ws}/o1.zarr"],
            ("precious", "no zarr group"),
            ALL,
        ),
        Case(
            "unknown channel",
            "engine",
            [*RUN, "--channels", "DAPI,CY5", "--out", "{ws}/o2.zarr"],
            ("A/1/0", "no channel 'CY5'", "DAPI, GFP", "--channels"),
            ALL,
        ),
        Case(
            "unknown segmentation channel",
            "engine",
            [*RUN, "--segment-channel", "CY5", "--out", "{ws}/o3.zarr"],
            ("no channel 'CY5'", "--segment-channel"),
            ALL,
        ),
        Case(
            "unknown label image",
            "engine",
            [*RUN, "--labels", "NOPE", "--out", "{ws}/o4.zarr"],
            ("plate.zarr/A/1/0", "no label image 'NOPE'", "nuclei", "--labels"),
            ALL,
        ),
        Case("unknown well", "engine", [*RUN, "--wells", "C/7", "--out", "{ws}/o5.zarr"], ("no well C/7",), ALL),
        Case(
            "field missing on disk",
            "engine",
            [*RUN, "--labels", "nuclei", "--out", "{ws}/o6.zarr"],
            ("A/1/1", "missing on disk"),
            (),
            _delete_field,
        ),
        Case(
            "damaged chunk",
            "engine",
            [*RUN, "--labels", "nuclei", "--out", "{ws}/o7.zarr"],
            ("B/2/0", "chunk cannot be read"),
            (),
            _corrupt_chunk,
        ),
        Case(
            "text file as checkpoint",
            "engine",
            ["run", "{ws}/plate.zarr", "--model", "{ws}/text.pth", "--out", "{ws}/o8.zarr"],
            ("text.pth", "not a PyTorch checkpoint"),
            ALL,
        ),
        Case(
            "5-channel model, 2-channel plate",
            "engine",
            ["run", "{ws}/plate.zarr", "--model", "{ws}/five.pth", "--labels", "nuclei", "--out", "{ws}/o9.zarr"],
            ("expects 5 channels", "--channels"),
            ALL,
        ),
        Case(
            "default model, plate without its channels",
            "engine",
            ["run", "{ws}/plate.zarr", "--labels", "nuclei", "--out", "{ws}/o10.zarr"],
            ("default model", "CTIP2", "this plate lacks them", "--model"),
            ALL,
        ),
        Case(
            "run --overwrite onto a training run",
            "engine",
            [*RUN, "--labels", "nuclei", "--out", "{ws}/trainrun", "--overwrite"],
            ("trainrun", "holds the output of scdino-train"),
            ("trainrun",),
            _train_run,
        ),
        Case(
            "profiles onto a user's profiles CSV",
            "engine",
            ["profiles", "{ws}/cells.zarr", "--out", "{ws}/user_profiles.csv"],
            ("user_profiles.csv", "not written by scdino"),
            ("user_profiles.csv",),
        ),
        Case(
            "export beside a user's model.json",
            "export",
            ["onnx", "{ws}/ck.pth", "--n-channels", "3", "--crop-size", "32", "--out", "{ws}/cfg/model.onnx"],
            ("model.json", "not a scdino sidecar"),
            ("cfg",),
        ),
        Case(
            "run --out a file with --overwrite",
            "engine",
            [*RUN, "--labels", "nuclei", "--out", "{ws}/plain.txt", "--overwrite"],
            ("plain.txt", "is a file"),
            ALL,
        ),
        Case(
            "NaN pixels, built-in segmentation",
            "engine",
            ["run", "{ws}/nan.zarr", "--model", "random:vit_test16", "--crop-size", "16", "--out", "{ws}/o11.zarr"],
            ("nan.zarr/A/1/1", "channel GFP", "non-finite pixels (NaN, +inf)", "Replace them"),
            ALL,
            _bad_pixel_plates,
        ),
        Case(
            "NaN pixels, stored labels",
            "engine",
            ["run", "{ws}/nan.zarr", "--labels", "nuclei", "--model", "random:vit_test16", "--crop-size", "16",
             "--out", "{ws}/o12.zarr"],
            ("nan.zarr/A/1/1", "channel GFP", "16 non-finite pixels"),
            ALL,
            _bad_pixel_plates,
        ),  # fmt: skip
        Case(
            "negative labels",
            "engine",
            ["run", "{ws}/neg.zarr", "--labels", "nuclei", "--model", "random:vit_test16", "--crop-size", "16",
             "--out", "{ws}/o13.zarr"],
            ("neg.zarr/B/2/0/labels/nuclei", "4 pixels hold negative labels", "set the negative values to 0"),
            ALL,
            _bad_pixel_plates,
        ),  # fmt: skip
        Case(
            "model.onnx replaced by another model's graph",
            "engine",
            ["run", "{ws}/crops.zarr", "--model", "{ws}/m.onnx", "--out", "{ws}/o14.zarr"],
            ("m.onnx", "not the model its sidecar m.json describes", "sha256", "export the model again"),
            ("crops.zarr", "m.json"),
            _swap_graph,
        ),
        Case(
            "quantize another model's graph",
            "export",
            ["quantize", "{ws}/m.onnx", "--out", "{ws}/q.onnx"],
            ("m.onnx", "not the model its sidecar m.json describes"),
            ("crops.zarr", "m.json"),
            _swap_graph,
        ),
        Case(
            "train on a folder of class TIFFs",
            "train",
            ["--data", "{ws}/tiffs", *TRAIN[2:], "--out", "{ws}/o_train"],
            ("tiffs", "TIFFs in class sub-folders", "scdino-engine ingest", "crops.zarr"),
            ALL,
            before_work=True,
        ),
        Case(
            "train on too few crops for a batch",
            "train",
            [*TRAIN[:7], "64", *TRAIN[8:], "--out", "{ws}/o_train2"],
            ("crops.zarr", "fewer than one global batch", "--batch-size-per-device"),
            ALL,
            before_work=True,
        ),
        Case(
            "run on a folder of class TIFFs",
            "engine",
            ["run", "{ws}/tiffs", "--out", "{ws}/o15.zarr"],
            ("tiffs", "scdino-engine ingest"),
            ALL,
            before_work=True,
        ),
        Case(
            "resume a truncated training checkpoint",
            "train",
            [*TRAIN, "--out", "{ws}/trainrun", "--epochs", "2", "--extend"],
            ("checkpoint.pth", "cannot be read", "checkpoint0001.pth", "copy it"),
            ALL,
            _truncated_run,
        ),
    ]


def _bad_pixel_plates(ws: Path) -> None:
    """``nan.zarr``: the tiny plate in float32 with NaN and +inf in field A/1/1's GFP; ``neg.zarr``: its labels with a
    negative value in field B/2/0 (an "ignore" mark some tools write)."""
    from conftest import blob_field
    from scdino.engine.sample import FieldImage, write_plate

    def fields(rng):
        return [blob_field(rng, [(20, 20), (50, 64)]), blob_field(rng, [(48, 30), (48, 90)])]

    a, b = fields(np.random.default_rng(0))
    img = b.image.astype(np.float32)
    img[1, :3, :5] = np.nan
    img[1, 90, 0] = np.inf
    a = FieldImage(a.image.astype(np.float32), a.labels)
    write_plate(ws / "nan.zarr", {"A/1": [a, FieldImage(img, b.labels)]}, ["DAPI", "GFP"], ngff="0.5", name="nan")
    c, d = fields(np.random.default_rng(1))
    labels = d.labels["nuclei"].astype(np.int32)
    labels[0, :4] = -1
    write_plate(ws / "neg.zarr", {"A/1": [c], "B/2": [FieldImage(d.image, {"nuclei": labels})]}, ["DAPI", "GFP"])


def _swap_graph(ws: Path) -> None:
    """``m.onnx`` replaced by the graph of another network of the same shapes; its ``m.json`` left beside it."""
    from scdino.export.onnx_export import export_onnx
    from scdino.models.card import describe_model

    card = describe_model("random:vit_test16", n_channels=3, input_size=32, seed=7)
    export_onnx(card, ws / "other.onnx", crop_size=32)
    shutil.copyfile(ws / "other.onnx", ws / "m.onnx")


def _truncate_onnx(ws: Path) -> None:
    data = (ws / "m.onnx").read_bytes()
    (ws / "m.onnx").write_bytes(data[: len(data) // 3])


KNN = ["knn", "{ws}/cells.zarr", "--label-key", "class"]
RUN_OUT = [*RUN, "--labels", "nuclei", "--out", "{ws}/o_bad.zarr"]
UMAP = ["umap", "{ws}/cells.zarr"]
EVALUATE = ["evaluate", "{ws}/crops.zarr", "--models", "random:vit_test16", "--input-size", "32", "--out", "{ws}/o_ev"]
ATTENTION = ["attention", "{ws}/crops.zarr", "--model", "random:vit_test16", "--out", "{ws}/o_att"]

#: numbers out of bounds: (name, args, words of the one error line); expected bounds as the --help texts state them
NUMBERS = [
    ("knn --k 0", [*KNN, "--k", "0"], ("--k 0", "whole number of at least 1")),
    ("knn --k -3", [*KNN, "--k", "-3"], ("--k -3", "at least 1")),
    ("knn --temperature -1", [*KNN, "--temperature", "-1"], ("--temperature -1.0", "above 0")),
    ("knn --temperature 0", [*KNN, "--temperature", "0"], ("--temperature 0.0", "above 0")),
    ("knn --temperature nan", [*KNN, "--temperature", "nan"], ("--temperature nan", "above 0")),
    ("knn --train-fraction 1.5", [*KNN, "--train-fraction", "1.5"], ("--train-fraction 1.5", "above 0 and below 1")),
    ("knn --train-fraction 0", [*KNN, "--train-fraction", "0"], ("--train-fraction 0.0", "above 0 and below 1")),
    ("knn --train-fraction 1", [*KNN, "--train-fraction", "1"], ("--train-fraction 1.0", "below 1")),
    ("knn --seed -1", [*KNN, "--seed", "-1"], ("--seed -1", "at least 0")),
    ("run --sigma -1 --min-area -5", [*RUN_OUT, "--sigma", "-1", "--min-area", "-5"], ("--sigma -1.0", "at least 0")),
    ("run --min-area -5", [*RUN_OUT, "--min-area", "-5"], ("--min-area -5", "at least 0")),
    ("run --max-area -1", [*RUN_OUT, "--max-area", "-1"], ("--max-area -1", "at least 0")),
    ("run --min-distance -2", [*RUN_OUT, "--min-distance", "-2"], ("--min-distance -2", "at least 0")),
    (
        "run --max-area below --min-area",
        [*RUN_OUT, "--min-area", "50", "--max-area", "10"],
        ("--max-area 10 is below --min-area 50", "no nucleus"),
    ),
    ("run --threshold abc", [*RUN_OUT, "--threshold", "abc"], ("--threshold abc", "otsu, li or a number")),
    ("run --batch-size 0", [*RUN_OUT, "--batch-size", "0"], ("--batch-size 0", "at least 1")),
    ("run --workers 0", [*RUN_OUT, "--workers", "0"], ("--workers 0", "at least 1")),
    ("run --threads 0", [*RUN_OUT, "--threads", "0"], ("--threads 0", "at least 1")),
    ("run --chunk-cells -1", [*RUN_OUT, "--chunk-cells", "-1"], ("--chunk-cells -1", "at least 1")),
    ("run --chunk-cells 0", [*RUN_OUT, "--chunk-cells", "0"], ("--chunk-cells 0", "at least 1")),
    ("run --input-size 0", [*RUN_OUT, "--input-size", "0"], ("--input-size 0", "at least 1")),
    ("run --crop-size 2", [*RUN_OUT, "--crop-size", "2"], ("--crop-size 2", "at least 4")),
    ("run --crop-um -3", [*RUN_OUT, "--crop-um", "-3"], ("--crop-um -3.0", "above 0")),
    (
        "run --crop-size 100000",
        [*RUN_OUT, "--crop-size", "100000"],
        ("plate.zarr/A/1/0", "crop of 100000 px is larger than the field (96 x 128 px)", "--crop-size at most 128"),
    ),
    (
        "run --crop-um 1000 (2000 px at 0.5 um)",
        [
            "run",
            "{ws}/plate.zarr",
            "--model",
            "random:vit_test8",
            "--labels",
            "nuclei",
            "--crop-um",
            "1000",
            "--out",
            "{ws}/o_bad.zarr",
        ],
        ("crop of 2000 px is larger than the field (96 x 128 px)", "--crop-um"),
    ),
    ("umap --n-neighbors 1", [*UMAP, "--n-neighbors", "1"], ("--n-neighbors 1", "at least 2")),
    ("umap --min-dist -0.5", [*UMAP, "--min-dist", "-0.5"], ("--min-dist -0.5", "at least 0")),
    ("umap --spread 0", [*UMAP, "--spread", "0"], ("--spread 0.0", "above 0")),
    (
        "umap --min-dist 2 --spread 1",
        [*UMAP, "--min-dist", "2", "--spread", "1"],
        ("--min-dist 2.0 is above --spread",),
    ),
    ("umap --epochs 0", [*UMAP, "--epochs", "0"], ("--epochs 0", "at least 1")),
    ("umap --fit-max 0", [*UMAP, "--fit-max", "0"], ("--fit-max 0", "at least 3")),
    ("evaluate --k 0", [*EVALUATE, "--k", "0"], ("--k 0", "at least 1")),
    ("evaluate --temperature 0", [*EVALUATE, "--temperature", "0"], ("--temperature 0.0", "above 0")),
    (
        "evaluate --input-size 0",
        ["evaluate", "{ws}/crops.zarr", "--models", "random:vit_test16", "--out", "{ws}/o_ev", "--input-size", "0"],
        ("--input-size 0", "at least 1"),
    ),
    ("attention --per-class 0", [*ATTENTION, "--per-class", "0"], ("--per-class 0", "at least 1")),
    ("attention --input-size -8", [*ATTENTION, "--input-size", "-8"], ("--input-size -8", "at least 1")),
    ("attention --seed -1", [*ATTENTION, "--seed", "-1"], ("--seed -1", "at least 0")),
    (
        "replicates --null-draws 0",
        ["replicates", "{ws}/profiles.parquet", "--key", "treatment", "--null-draws", "0"],
        ("--null-draws 0", "at least 1"),
    ),
]


def number_cases() -> list[Case]:
    """Every kind of numeric option out of its bounds: one line naming the option, before any work starts."""
    return [Case(name, "engine", args, words, ALL, before_work=True) for name, args, words in NUMBERS]


def guard_cases() -> list[Case]:
    """Outputs inside an input, the wrong kind of input, a damaged model file."""
    return [
        Case(
            "run --out inside the plate",
            "engine",
            [*RUN, "--labels", "nuclei", "--out", "{ws}/plate.zarr/A/inner.zarr"],
            ("plate.zarr/A/inner.zarr", "is inside the input", "--out"),
            ALL,
            before_work=True,
        ),
        Case(
            "knn on a plate",
            "engine",
            ["knn", "{ws}/plate.zarr", "--label-key", "class"],
            ("plate.zarr", "not an embeddings store", "scdino-engine run"),
            ALL,
            before_work=True,
        ),
        Case(
            "umap on a crop store",
            "engine",
            ["umap", "{ws}/crops.zarr"],
            ("crops.zarr", "not an embeddings store", "holds the output of scdino-engine ingest"),
            ALL,
            before_work=True,
        ),
        Case(
            "run a truncated model.onnx",
            "engine",
            ["run", "{ws}/crops.zarr", "--model", "{ws}/m.onnx", "--out", "{ws}/o_onnx.zarr"],
            ("m.onnx", "not a readable ONNX model", "truncated", "export it again"),
            ("crops.zarr", "m.json"),
            _truncate_onnx,
            before_work=True,
        ),
    ]


@contextmanager
def failing_writes(root: Path, err: int, budget: int = 0) -> Iterator[None]:
    """Writes under the folder ``root`` fail as the kernel fails them, at the calls that make them (Python's ``open``
    and ``os`` functions, pyarrow's parquet writer): ``EROFS`` (a read-only location) refuses every file, folder and
    rename there; ``ENOSPC`` (a full disk) lets files and folders be made but fails every write once ``budget`` bytes
    have been written there, so that what a command left half-written stays on disk for the check."""
    import pyarrow.parquet as pq

    root = Path(os.path.abspath(root))
    written = [0]
    real_open, real_os_open, real_write, real_mkdir = builtins.open, os.open, os.write, os.mkdir
    real_rename, real_replace, real_link = os.rename, os.replace, os.link
    real_writer_init, real_write_table = pq.ParquetWriter.__init__, pq.ParquetWriter.write_table

    def under(path) -> bool:
        if isinstance(path, int) or path is None:
            return False
        return Path(os.path.abspath(os.fsdecode(path))).is_relative_to(root)

    def fail(path) -> OSError:
        return OSError(err, os.strerror(err), os.fsdecode(path))

    def spend(n: int, path) -> None:
        if written[0] + n > budget:
            raise fail(path)
        written[0] += n

    class FullFile(io.BufferedIOBase):
        """A file on a full disk: made, but writes beyond the budget fail."""

        def __init__(self, f) -> None:
            self.f = f

        def write(self, data) -> int:
            spend(len(memoryview(data).cast("B")) if not isinstance(data, str) else len(data), self.f.name)
            return self.f.write(data)

        def __getattr__(self, name):
            return getattr(self.f, name)

        def close(self) -> None:
            self.f.close()

        def __enter__(self):
            return self

        def __exit__(self, *exc) -> None:
            self.f.close()

    def fake_open(file, mode="r", *a, **k):
        if under(file) and any(c in mode for c in "wax+"):
            if err != errno.ENOSPC:
                raise fail(file)
            return FullFile(real_open(file, mode, *a, **k))
        return real_open(file, mode, *a, **k)

    def fake_os_open(path, flags, *a, **k):
        if under(path) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT) and err != errno.ENOSPC:
            raise fail(path)
        return real_os_open(path, flags, *a, **k)

    def fake_write(fd, data):
        if err == errno.ENOSPC:
            try:
                target = os.readlink(f"/proc/self/fd/{fd}")
            except OSError:
                target = None
            if under(target):
                spend(len(data), target)
        return real_write(fd, data)

    def fake_mkdir(path, *a, **k):
        if under(path) and err != errno.ENOSPC:
            raise fail(path)
        return real_mkdir(path, *a, **k)

    def moving(real):
        def move(src, dst, *a, **k):
            if err != errno.ENOSPC and (under(src) or under(dst)):
                raise fail(dst)
            return real(src, dst, *a, **k)

        return move

    def writer_init(self, where, *a, **k):
        if under(where) and err != errno.ENOSPC:
            raise fail(where)
        real_writer_init(self, where, *a, **k)
        self._fault_where = where

    def write_table(self, table, *a, **k):
        if under(getattr(self, "_fault_where", None)):
            spend(table.nbytes, self._fault_where)
        return real_write_table(self, table, *a, **k)

    with ExitStack() as stack:
        for target, new in [
            ("builtins.open", fake_open),
            ("io.open", fake_open),
            ("os.open", fake_os_open),
            ("os.write", fake_write),
            ("os.mkdir", fake_mkdir),
            ("os.rename", moving(real_rename)),
            ("os.replace", moving(real_replace)),
            ("os.link", moving(real_link)),
            ("pyarrow.parquet.ParquetWriter.__init__", writer_init),
            ("pyarrow.parquet.ParquetWriter.write_table", write_table),
        ]:
            stack.enter_context(mock.patch(target, new))
        yield


def read_only(folder: str) -> Callable[[Path], ContextManager]:
    """During the command: the workspace's ``folder`` (made empty) is on a read-only file system."""

    def during(ws: Path) -> ContextManager:
        (ws / folder).mkdir(exist_ok=True)
        return failing_writes(ws / folder, errno.EROFS)

    return during


def full_disk(folder: str, budget: int = 0) -> Callable[[Path], ContextManager]:
    """During the command: the workspace's ``folder`` (made empty) is on a disk with ``budget`` bytes left."""

    def during(ws: Path) -> ContextManager:
        (ws / folder).mkdir(exist_ok=True)
        return failing_writes(ws / folder, errno.ENOSPC, budget)

    return during


def _damage_metadata(level: str) -> Callable[[Path], None]:
    """Setup: the ``zarr.json`` of ``plate.zarr/<level>`` cut short (a copy that stopped while writing it)."""

    def damage(ws: Path) -> None:
        (ws / "plate.zarr" / level / "zarr.json").write_text('{"zarr_format": 3, "node')

    return damage


#: damaged metadata below the plate: (level, what it is)
METADATA_LEVELS = [
    ("B/2", "well"),
    ("B/2/0", "field"),
    ("B/2/0/s0", "image array"),
    ("B/2/0/labels/nuclei", "label image"),
    ("B/2/0/labels/nuclei/s0", "label array"),
]


def io_cases() -> list[Case]:
    """Damaged files on disk, locations that cannot be written and disks that fill up: one line, nothing half-written."""
    return [
        Case(
            f"damaged zarr.json of a {what}",
            "engine",
            [*RUN, "--labels", "nuclei", "--out", "{ws}/o_meta.zarr"],
            (f"plate.zarr/{level}", "zarr metadata cannot be read", "copy or convert it again"),
            ALL,
            _damage_metadata(level),
            before_work=level.count("/") < 3,  # a label image is read by the task that finds the field's cells
        )
        for level, what in METADATA_LEVELS
    ] + write_fault_cases()


def _not_a_tiff(ws: Path) -> None:
    """A text file named like a crop, sorted after the real ones (found while the store is being written)."""
    (ws / "tiffs" / "m0" / "zz_notes.tif").write_text("not an image")


def _not_a_tiff_first(ws: Path) -> None:
    (ws / "tiffs" / "m0" / "_notes.tif").write_text("not an image")


def _store_cut_short(ws: Path) -> None:
    """What a run stopped while making its store leaves: its marker and part of the cell table, no run metadata."""
    out = ws / "o_cut.zarr"
    out.mkdir()
    (out / ".scdino").write_text('{"written_by": "scdino-engine run"}\n')
    (out / "obs").mkdir()
    (out / "obs" / "zarr.json").write_text('{"zarr_format": 3, "node_type": "group", "attributes": {}}')


def _cells_in_ro(ws: Path) -> None:
    (ws / "ro").mkdir()
    shutil.copytree(ws / "cells.zarr", ws / "ro" / "cells.zarr")


RUN_CROPS = ["run", "{ws}/crops.zarr", "--model", "random:vit_test16", "--input-size", "32"]
EXPORT = ["onnx", "{ws}/ck.pth", "--n-channels", "3", "--crop-size", "32"]
NO_SPACE = ("no space left on the device", "free space there or choose another output location")


@contextmanager
def offline(ws: Path) -> Iterator[None]:
    """No network: a hub model's download fails (into an empty hub cache in the workspace)."""
    import urllib.error

    def no_network(url, dst, *a, **k):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    (ws / "hub").mkdir(exist_ok=True)
    with (
        mock.patch("torch.hub.download_url_to_file", no_network),
        mock.patch("torch.hub.get_dir", lambda: str(ws / "hub")),
    ):
        yield


def write_fault_cases() -> list[Case]:
    """A read-only location or a full disk under each writer: one line, and no partial file or empty folder left."""
    ro, full = read_only("ro"), full_disk("full")
    return [
        Case(
            "run -> read-only location",
            "engine",
            [*RUN_CROPS, "--out", "{ws}/ro/o.zarr"],
            ("ro/o.zarr", "Read-only file system", "choose a writable --out"),
            ALL,
            during=ro,
            empty="ro",
        ),
        Case(
            "run -> disk full while the store is made",
            "engine",
            [*RUN_CROPS, "--out", "{ws}/full/o.zarr"],
            NO_SPACE,
            ALL,
            during=full_disk("full", 4096),
            empty="full",
        ),
        Case(
            "run onto a store cut short while being made",
            "engine",
            [*RUN_CROPS, "--out", "{ws}/o_cut.zarr"],
            ("o_cut.zarr", "stopped while its store was being made", "pass --overwrite"),
            ("o_cut.zarr",),
            _store_cut_short,
            before_work=True,
        ),
        Case(
            "umap --png on a read-only location",
            "engine",
            ["umap", "{ws}/cells.zarr", "--png", "{ws}/ro/u.png"],
            ("ro/u.png", "read-only", "--png"),
            ALL,
            during=ro,
            empty="ro",
        ),
        Case(
            "umap of a store on a read-only location",
            "engine",
            ["umap", "{ws}/ro/cells.zarr", "--png", "{ws}/u.png"],
            ("ro/cells.zarr", "read-only", "copy the store to a writable location"),
            ("ro/cells.zarr", *ALL),
            _cells_in_ro,
            during=ro,
        ),
        Case(
            "knn --out on a read-only location",
            "engine",
            [*KNN, "--out", "{ws}/ro/knn"],
            ("ro/knn", "read-only", "--out"),
            ALL,
            during=ro,
            empty="ro",
        ),
        Case(
            "export onnx -> read-only location",
            "export",
            [*EXPORT, "--out", "{ws}/ro/m.onnx"],
            ("ro/m.onnx", "read-only", "--out"),
            ALL,
            during=ro,
            empty="ro",
        ),
        Case(
            "export onnx -> full disk",
            "export",
            [*EXPORT, "--out", "{ws}/full/m.onnx"],
            NO_SPACE,
            ALL,
            during=full,
            empty="full",
        ),
        Case(
            "export-cells -> full disk",
            "engine",
            ["export-cells", "{ws}/cells.zarr", "--out", "{ws}/full/c.parquet"],
            NO_SPACE,
            ALL,
            during=full,
            empty="full",
        ),
        Case(
            "export-cells -> read-only location",
            "engine",
            ["export-cells", "{ws}/cells.zarr", "--out", "{ws}/ro/c.parquet"],
            ("ro/c.parquet", "read-only", "--out"),
            ALL,
            during=ro,
            empty="ro",
        ),
        Case(
            "quantize -> full disk",
            "export",
            ["quantize", "{ws}/m.onnx", "--out", "{ws}/full/q.onnx"],
            NO_SPACE,
            ALL,
            during=full,
            empty="full",
        ),
        Case(
            "quantize a truncated model.onnx",
            "export",
            ["quantize", "{ws}/m.onnx", "--out", "{ws}/q.onnx"],
            ("m.onnx", "not a readable ONNX model", "export it again"),
            ("crops.zarr", "m.json"),
            _truncate_onnx,
            before_work=True,
        ),
        Case(
            "ingest -> full disk",
            "engine",
            ["ingest", "{ws}/tiffs", "{ws}/full/i.zarr"],
            NO_SPACE,
            ALL,
            during=full,
            empty="full",
        ),
        Case(
            "ingest a folder whose first .tif is not a TIFF",
            "engine",
            ["ingest", "{ws}/tiffs", "{ws}/i.zarr"],
            ("_notes.tif", "not a readable TIFF", "move it out of the folder"),
            ALL,
            _not_a_tiff_first,
            before_work=True,
        ),
        Case(
            "ingest a folder with a non-TIFF .tif among the crops",
            "engine",
            ["ingest", "{ws}/tiffs", "{ws}/i.zarr"],
            ("zz_notes.tif", "not a readable TIFF", "move it out of the folder"),
            ALL,
            _not_a_tiff,
            before_work=True,
        ),
        Case(
            "attention of an unknown cell leaves no report folder",
            "engine",
            [*ATTENTION, "--input-size", "32", "--cells", "no/such/cell"],
            ("no/such/cell",),
            ALL,
            before_work=True,
        ),
        Case(
            "evaluate with a channel set the model was not trained on",
            "engine",
            [*EVALUATE[:3], "default", "--channel-sets", "CTIP2,BRN2,ROR;BRN2,CTIP2,ROR", "--out", "{ws}/o_ev"],
            ("the default model: trained on channels CTIP2, BRN2, ROR", "pass --channel-sets CTIP2,BRN2,ROR"),
            ALL,
            before_work=True,
        ),
        Case(
            "export onnx of a hub model, offline",
            "export",
            ["onnx", "dino_vits16", "--n-channels", "3", "--out", "{ws}/h.onnx"],
            ("dino_vits16: the download", "failed", "pass its path instead of dino_vits16"),
            ALL,
            during=offline,
        ),
        Case(
            "evaluate -> full disk",
            "engine",
            [*EVALUATE[:-1], "{ws}/full/ev"],
            NO_SPACE,
            ALL,
            during=full,
            empty="full",
        ),
    ]


def cases() -> list[Case]:
    return writer_cases() + input_cases() + number_cases() + guard_cases() + io_cases()


def run_case(case: Case, ws: Path) -> Outcome:
    """Run one case in this process (as the shell would), against a fresh copy of the workspace ``ws``."""
    from click.testing import CliRunner

    from scdino.engine.cli import main as engine
    from scdino.export.cli import main as export
    from scdino.training.cli import main as train

    if case.setup is not None:
        case.setup(ws)
    before = {k: fingerprint(ws / k) for k in case.keep}
    entries = {p.name for p in ws.iterdir()}
    args = [a.replace("{ws}", str(ws)) for a in case.args]
    with case.during(ws) if case.during is not None else ExitStack():
        r = CliRunner().invoke({"engine": engine, "export": export, "train": train}[case.tool], args)
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        import traceback

        stderr = "".join(traceback.format_exception(r.exception))
    else:
        stderr = r.stderr
    errors = [ln for ln in stderr.splitlines() if ln.startswith("error:")]
    after = {k: fingerprint(ws / k) for k in case.keep}
    left = sorted(str(p.relative_to(ws)) for p in (ws / case.empty).rglob("*")) if case.empty else []
    return Outcome(
        case, r.exit_code, stderr, errors, before, after, sorted({p.name for p in ws.iterdir()} - entries), left
    )


def main() -> None:
    import tempfile

    os.environ.setdefault("OMP_NUM_THREADS", "2")
    base = make_workspace(Path(tempfile.mkdtemp(prefix="scdino-faults-")) / "ws")
    rows = []
    for i, case in enumerate(cases()):
        ws = base.parent / f"ws{i}"
        shutil.copytree(base, ws)
        o = run_case(case, ws)
        kept = o.kept and not (case.before_work and o.new)
        ok = o.code == 2 and len(o.errors) == 1 and all(w in o.errors[0] for w in case.words) and kept
        msg = o.errors[0].removeprefix("error: ") if o.errors else " ".join(o.stderr.strip().splitlines()[-1:])
        msg = msg.replace(str(ws), "WS").replace("|", "\\|")  # the workspace as WS; a table cell
        files = "unchanged" if kept else f"CHANGED {o.before} -> {o.after}, new {o.new}, left {o.left}"
        rows.append((case.name, o.code, msg, files, "ok" if ok else "FAIL"))
        shutil.rmtree(ws)
    print("| input | exit | message | files before/after | check |")
    print("|---|---|---|---|---|")
    for name, code, msg, files, ok in rows:
        print(f"| {name} | {code} | {msg} | {files} | {ok} |")
    failed = sum(r[-1] != "ok" for r in rows)
    print(f"\n{len(rows) - failed} passed, {failed} failed")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
