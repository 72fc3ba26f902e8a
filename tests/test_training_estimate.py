"""The cost scdino-train states before its first epoch: parameter counts against the built networks, memory parts
against their definitions, and the lines a CPU user reads."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from scdino.data import packaged_crops
from scdino.training import estimate as est
from scdino.training import loop as loop_mod
from scdino.training.config import build_config


def _cfg(tmp_path, *sets, arch="vit_tiny", patch=8):
    return build_config(
        None, ["precision=fp32", *sets], data="crops", out=str(tmp_path / "run"), arch=arch, patch=patch, epochs=1,
        batch_size_per_device=4, device="cpu",
    )  # fmt: skip


@pytest.mark.parametrize("arch,patch,sets", [("vit_tiny", 8, ()), ("vit_test", 8, ("out_dim=300", "head_hidden=64"))])
def test_parameter_counts_are_those_of_the_built_networks(tmp_path, arch, patch, sets):
    cfg = _cfg(tmp_path, "global_size=40", "local_size=24", *sets, arch=arch, patch=patch)
    student, _ = loop_mod.build_networks(cfg, 3)
    backbone, head = est._params(cfg, est._arch(cfg, 3))
    assert backbone == sum(p.numel() for p in student.backbone.parameters())
    assert head == sum(p.numel() for p in student.head.parameters())


def test_memory_parts_follow_the_settings(tmp_path):
    crops = torch.zeros(100, 3, 40, 40, dtype=torch.int32)
    cfg = _cfg(tmp_path)  # the scDINO defaults: 224 px globals, 8 locals at 96 px, a 65,536-wide head
    e = est.estimate(cfg, crops, n_iter=25, rate=1e11)
    # 4 bytes x batch 4 x (2 x 785 + 8 x 145 tokens) x 20 x 192 floats x 12 blocks
    assert e["activations_gb"] == pytest.approx(4 * 4 * (2 * 785 + 8 * 145) * 20 * 192 * 12 / 1e9)
    assert e["crops_gb"] == pytest.approx(100 * 3 * 40 * 40 * 4 / 1e9)
    assert e["head_and_loss_gb"] == pytest.approx(4 * 4 * 65536 * (20 + 18 + 4) / 1e9)
    assert e["minutes_per_epoch"] == pytest.approx(25 * e["seconds_per_step"] / 60)
    lean = est.estimate(_cfg(tmp_path, "activation_checkpointing=true"), crops, n_iter=25, rate=1e11)
    assert lean["activations_gb"] < e["activations_gb"] / 3 and lean["seconds_per_step"] > e["seconds_per_step"]
    small = est.estimate(_cfg(tmp_path, "global_size=40", "local_size=24"), crops, n_iter=25, rate=1e11)
    assert small["tflop_per_step"] < e["tflop_per_step"] / 20


def test_a_cpu_run_is_told_its_cost_before_the_first_epoch(tmp_path, caplog, monkeypatch):
    import psutil

    crops = torch.from_numpy(packaged_crops()[:8, :, 8:40, 8:40].astype(np.int32))
    cfg = _cfg(tmp_path, "global_size=32", "local_size=16", "local_crops=2", "out_dim=64", "head_hidden=64",
               "head_bottleneck=32", "warmup_epochs=0", arch="vit_test")  # fmt: skip
    free = type("VM", (), {"available": 1})()  # as if 1 byte were free
    monkeypatch.setattr(psutil, "virtual_memory", lambda: free)
    with caplog.at_level(logging.INFO, logger="scdino.training"):
        loop_mod.train(cfg, loop_mod.data_from_crops(cfg, crops, ["a", "b", "c"]))
    text = [r.getMessage() for r in caplog.records]
    first_epoch = next(i for i, t in enumerate(text) if t.startswith("epoch 1/1"))
    told = next(i for i, t in enumerate(text) if t.startswith("these settings need about"))
    assert told < first_epoch and "min an epoch of 2 steps on this CPU" in text[told]
    assert any("GB free: lower it with --set activation_checkpointing=true" in t for t in text[:first_epoch])
