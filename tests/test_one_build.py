"""Each command builds each model once: a model card is read from the checkpoint without building the network, and
the network is built when the card is loaded. Counted by the ViT constructor's calls in this process (evaluate's runs
go to a worker thread of this process)."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

from conftest import dino_full_checkpoint, write_class_tiffs
from scdino.data import packaged_crops
from scdino.engine.ingest import ingest
from scdino.models.vit import VisionTransformer


@pytest.fixture()
def builds(monkeypatch):
    """Every ViT built in this process, by (patch size, input size, channels)."""
    seen: Counter = Counter()
    init = VisionTransformer.__init__

    def counting(self, cfg, *a, **kw):
        seen[(cfg.patch_size, cfg.img_size, cfg.in_chans)] += 1
        init(self, cfg, *a, **kw)

    monkeypatch.setattr(VisionTransformer, "__init__", counting)
    return seen


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    crops = packaged_crops()[:24, :, 8:40, 8:40]
    root = write_class_tiffs(tmp_path_factory.mktemp("tiffs"), crops, ["a", "b", "c"] * 8)
    out = tmp_path_factory.mktemp("store") / "crops.zarr"
    ingest(root, out, channels=["CTIP2", "BRN2", "ROR"], progress=False)
    return str(out)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "checkpoint.pth"
    dino_full_checkpoint(path, arch="vit_test8")
    return str(path)


def test_attention_builds_its_model_once(store, checkpoint, builds, tmp_path):
    from scdino.engine.attention import attention_command

    attention_command(store, checkpoint, str(tmp_path / "a"), per_class=1, input_size=32)
    assert dict(builds) == {(8, 32, 3): 1}  # resized to 32 px inputs as it is built, not built twice


def test_export_builds_its_model_once(checkpoint, builds, tmp_path):
    pytest.importorskip("onnxruntime")
    from scdino.export.onnx_export import export_onnx

    export_onnx(checkpoint, tmp_path / "m.onnx", n_channels=2, crop_size=24, input_size=32)
    assert dict(builds) == {(8, 32, 2): 1}


def test_training_builds_its_two_networks_and_never_the_model_it_starts_from(store, checkpoint, builds, tmp_path):
    from test_training import cfg_for

    from scdino.models.card import describe_model
    from scdino.training.loop import build_networks

    cfg = cfg_for(store, tmp_path / "t", epochs=1, init=checkpoint)
    student, teacher = build_networks(cfg, 3)
    assert dict(builds) == {(8, 32, 3): 2}  # the student and the teacher; the checkpoint's weights are copied in
    want = describe_model(checkpoint, n_channels=3, input_size=32).load().model.state_dict()  # a third build
    for k, v in want.items():
        torch.testing.assert_close(student.backbone.state_dict()[k], v, rtol=0, atol=0)
    assert builds[(8, 32, 3)] == 3


def test_evaluate_builds_each_model_once_per_channel_set(store, checkpoint, builds, tmp_path, monkeypatch):
    from distributed import Client, LocalCluster

    from scdino.engine.evaluate import evaluate

    monkeypatch.setenv("SCDINO_EXPORT_CACHE", "0")  # the cache's first use exports and times: its own builds
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=":0") as cluster:
        with Client(cluster) as client, client.as_current():
            r = evaluate(store, [checkpoint], [["CTIP2", "BRN2"], ["ROR"]], str(tmp_path / "e"), k=3, input_size=32,
                         progress=False)  # fmt: skip
    assert np.isfinite(np.array(r["top1"], dtype=float)[:, :2]).all()
    # the checkpoint and the untrained baseline (vit_test16 at 32 px), once per channel set each
    assert dict(builds) == {(8, 32, 2): 1, (8, 32, 1): 1, (16, 32, 2): 1, (16, 32, 1): 1}
