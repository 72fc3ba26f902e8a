"""Shared fixtures: synthetic plates with exact answers, real sample plates, DINO-layout checkpoints."""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

from scdino.engine.sample import FieldImage, write_plate, write_sample_plate
from scdino.models import arch_config, build_model
from scdino.models.card import ModelCard
from scdino.preprocess import Preprocessing

os.environ.setdefault("OMP_NUM_THREADS", "2")
# the session's own cache of ONNX exports (runs on a CPU use it): shared by every test, never the user's; removed
# when the session ends (about 110 MB of exports)
_OWN_CACHE = None if "SCDINO_CACHE_DIR" in os.environ else tempfile.mkdtemp(prefix="scdino-test-cache-")
if _OWN_CACHE:
    os.environ["SCDINO_CACHE_DIR"] = _OWN_CACHE


def pytest_sessionfinish(session, exitstatus):
    if _OWN_CACHE and os.environ.get("SCDINO_CACHE_DIR") == _OWN_CACHE:
        import shutil

        shutil.rmtree(_OWN_CACHE, ignore_errors=True)


def blob_field(rng: np.random.Generator, centres, shape=(96, 128), radius=6, n_channels=2) -> FieldImage:
    """A synthetic field: bright disks (nuclei) on a dim noisy background, with their exact label image."""
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    labels = np.zeros(shape, np.uint32)
    img = rng.integers(90, 110, size=(n_channels, *shape)).astype(np.uint16)
    for i, (cy, cx) in enumerate(centres, start=1):
        disk = (yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2
        labels[disk] = i
        for c in range(n_channels):
            img[c][disk] += np.uint16(800 + 400 * c + 50 * i)
    return FieldImage(img, {"nuclei": labels})


def make_tiny_plate(path: Path, ngff: str = "0.5", n_channels: int = 2, seed: int = 0) -> str:
    rng = np.random.default_rng(seed)
    centres = [[(20, 20), (50, 64), (70, 100), (30, 110)], [(48, 30), (48, 90), (80, 60)]]
    wells = {
        "A/1": [blob_field(rng, centres[0], n_channels=n_channels), blob_field(rng, centres[1], n_channels=n_channels)],
        "B/2": [blob_field(rng, centres[1][::-1], n_channels=n_channels)],
    }
    names = ["DAPI", "GFP", "RFP", "CY5", "BF"][:n_channels]
    return write_plate(path, wells, names, pixel_size_um=0.5, ngff=ngff, name="tiny")


def write_class_tiffs(root: Path, crops: np.ndarray, classes, stem: str = "c") -> Path:
    """The paper's published layout from crops (n, C, S, S): ``root/<class>/<stem>NNN.tif``, channels last."""
    import tifffile

    for i, (c, cls) in enumerate(zip(crops, classes)):
        (root / str(cls)).mkdir(parents=True, exist_ok=True)
        tifffile.imwrite(root / str(cls) / f"{stem}{i:03d}.tif", np.moveaxis(c, 0, -1))
    return root


@pytest.fixture(scope="session", autouse=True)
def client():
    """One Dask cluster for the whole session: every ``run`` reuses it (as it reuses a caller's client) instead of
    starting a cluster of its own, as each command-line call does."""
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster:
        with Client(cluster) as c:
            yield c


@pytest.fixture(scope="session")
def tiny_plate(tmp_path_factory) -> str:
    return make_tiny_plate(tmp_path_factory.mktemp("plates") / "tiny.zarr")


@pytest.fixture(scope="session")
def scratch_plate(tmp_path_factory) -> str:
    return write_sample_plate(tmp_path_factory.mktemp("plates") / "scratch.zarr", "scratch")


@pytest.fixture(scope="session")
def neocortex_plate(tmp_path_factory) -> str:
    return write_sample_plate(tmp_path_factory.mktemp("plates") / "neocortex.zarr", "neocortex")


def dino_full_checkpoint(
    path: Path, arch: str = "vit_test16", in_chans: int = 3, seed: int = 0, extra: dict | None = None
) -> dict[str, torch.Tensor]:
    """Write a checkpoint exactly as DINO's main_dino.py saves it; returns the teacher backbone state dict."""
    torch.manual_seed(seed)
    teacher = build_model(arch_config(arch, in_chans=in_chans)).state_dict()
    torch.manual_seed(seed + 1)
    student = build_model(arch_config(arch, in_chans=in_chans)).state_dict()
    d = teacher["cls_token"].shape[-1]
    head = {
        "head.mlp.0.weight": torch.randn(16, d),
        "head.mlp.0.bias": torch.zeros(16),
        "head.last_layer.weight_g": torch.ones(32, 1),
        "head.last_layer.weight_v": torch.randn(32, 16),
    }
    save = {
        "student": {
            **{f"module.backbone.{k}": v for k, v in student.items()},
            **{f"module.{k}": v for k, v in head.items()},
        },
        "teacher": {**{f"backbone.{k}": v for k, v in teacher.items()}, **head},
        "optimizer": {"state": {}, "param_groups": [{"lr": 0.0005, "params": [0, 1]}]},
        "epoch": 100,
        "args": argparse.Namespace(
            arch=arch.rstrip("0123456789"),
            patch_size=16,
            out_dim=65536,
            lr=0.0005,
            output_dir="./out",
            local_crops_number=8,
        ),
        "dino_loss": {"center": torch.zeros(1, 65536)},
    }
    if extra:
        save.update(extra)
    torch.save(save, path)
    return teacher


def sklearn_knn_top1(x: np.ndarray, y: np.ndarray, k: int, temperature: float = 0.07, seed: int = 0) -> float:
    """Top-1 of the paper's vote on the seeded stratified split, by scikit-learn: k cosine neighbours, each weighted
    exp(similarity / T) (a second implementation of the vote; the split is the protocol's)."""
    from sklearn.neighbors import KNeighborsClassifier

    from scdino.knn import split

    tr, te, _ = split(y, 0.8, seed)
    clf = KNeighborsClassifier(k, metric="cosine", weights=lambda d: np.exp((1 - d) / temperature), algorithm="brute")
    clf.fit(x[tr], y[tr])
    return float((clf.predict(x[te]) == y[te]).mean())


def stand_in_card(**fields) -> ModelCard:
    """The card of a stand-in exported model (2 channels of uint16 crops, 8 px, a ViT-test/16 at 32 px, untrained), with
    ``fields`` in place of those given: for backend tests that never open a real model file."""
    base = dict(
        spec="m.onnx", format="onnx", arch="vit_test16", embed_dim=6, input_size=32, preprocessing=Preprocessing(32),
        untrained=True, in_chans=2, channels=None, checkpoint_sha256=None, dtype="uint16", crop_size=8,
    )  # fmt: skip
    return ModelCard(**{**base, **fields})
