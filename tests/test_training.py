import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from scdino.data import packaged_crops
from scdino.errors import ConfigError
from scdino.training import loop as loop_mod
from scdino.training.augment import MultiCrop, gaussian_blur, make_generator
from scdino.training.config import TrainConfig, build_config
from scdino.training.dino import DINOLoss, cosine_scheduler
from scdino.training.loop import TrainingDiverged, train

TINY = [
    "global_size=32",
    "local_size=16",
    "local_crops=2",
    "out_dim=128",
    "head_hidden=64",
    "head_bottleneck=32",
    "warmup_epochs=1",
    "drop_path=0.0",
    "saveckp_freq=1",
    "precision=fp32",  # the same arithmetic on every CPU; bf16 has its own tests
]


@pytest.fixture(scope="module")
def crop_store(tmp_path_factory):
    """48 real neocortex nucleus crops as a crop store (the paper's TIFF layout ingested)."""
    from conftest import write_class_tiffs
    from scdino.engine.ingest import ingest
    from scdino.knn import dominant_channel_labels

    crops = packaged_crops()[:, :, 8:40, 8:40]
    root = tmp_path_factory.mktemp("tiffs")
    write_class_tiffs(root, crops, [f"m{lab}" for lab in dominant_channel_labels(crops)])
    out = tmp_path_factory.mktemp("store") / "crops.zarr"
    ingest(root, out, channels=["CTIP2", "BRN2", "ROR"], progress=False)
    return str(out)


def cfg_for(store, out, **kw) -> TrainConfig:
    sets = list(TINY) + [f"{k}={v}" for k, v in kw.items()]
    return build_config(
        None,
        sets,
        data=store,
        out=str(out),
        arch="vit_test",
        patch=8,
        epochs=kw.pop("epochs", 2),
        batch_size_per_device=8,
        device="cpu",
    )


def test_config_defaults_are_the_recipe_and_overrides_are_typed(tmp_path):
    c = TrainConfig(data="d", out="o")
    assert (c.lr, c.min_lr, c.weight_decay, c.weight_decay_end, c.clip_grad) == (5e-4, 1e-6, 0.04, 0.4, 3.0)
    assert (c.momentum_teacher, c.student_temp, c.teacher_temp, c.center_momentum) == (0.996, 0.1, 0.04, 0.9)
    assert (c.out_dim, c.local_crops, c.global_scale, c.local_scale, c.drop_path) == (
        65536,
        8,
        (0.4, 1.0),
        (0.05, 0.4),
        0.1,
    )
    f = tmp_path / "c.yaml"
    f.write_text("epochs: 7\nwarmup_epochs: 2\nlocal_scale: [0.1, 0.3]\n")
    c2 = build_config(str(f), ["lr=0.001", "norm_last_layer=false", "channels=A,B"], data="d", out="o")
    assert c2.epochs == 7 and c2.local_scale == (0.1, 0.3) and c2.lr == 0.001 and c2.norm_last_layer is False
    assert c2.channels == ["A", "B"]
    with pytest.raises(ConfigError, match="unknown option\\(s\\) lrr"):
        build_config(None, ["lrr=1"], data="d", out="o")
    with pytest.raises(ConfigError, match="multiples of the patch"):
        build_config(None, ["global_size=30"], data="d", out="o")
    with pytest.raises(ConfigError, match="warmup_epochs 10 cannot exceed epochs \\(5\\)"):
        build_config(None, ["epochs=5", "warmup_epochs=10"], data="d", out="o")  # set by the user: an error


def test_a_quick_run_scales_the_recipe_warmup_down(caplog):
    # the recipe's 10-epoch warmup on a 5-epoch try: a tenth of the run instead, said in a warning
    c = build_config(None, ["epochs=5"], data="d", out="o")
    assert c.warmup_epochs == 0 and "warmup of 10 epochs is longer than this 5-epoch run; using 0" in caplog.text
    assert build_config(None, ["epochs=40"], data="d", out="o").warmup_epochs == 10  # the recipe, untouched


def _aug(cfg_over=None):
    from types import SimpleNamespace

    cfg = SimpleNamespace(
        global_size=32,
        local_size=16,
        local_crops=3,
        global_scale=(0.4, 1.0),
        local_scale=(0.05, 0.4),
        aspect_ratio=(3 / 4, 4 / 3),
        blur_p=(1.0, 0.1, 0.5),
        solarize_p=0.2,
        flip_p=0.5,
        rotation=0.0,
        centre_views=False,
        brightness=(0.5, 1.25),
        brightness_p=0.8,
        brightness_per_channel=True,
        blur_sigma=(0.1, 2.0),
    )
    for k, v in (cfg_over or {}).items():
        setattr(cfg, k, v)
    return MultiCrop(cfg, torch.zeros(3), torch.ones(3))


def test_augmentation_shapes_ranges_determinism_and_slicing():
    x = torch.from_numpy(packaged_crops()[:8].astype(np.int32))
    aug = _aug()
    v = aug(x, make_generator(0, 0, 0))
    assert [t.shape for t in v] == [(8, 3, 32, 32)] * 2 + [(8, 3, 16, 16)] * 3
    assert all(float(t.min()) >= 0 and float(t.max()) <= 1 for t in v)  # mean 0, std 1: the [0, 1] range
    again = aug(x, make_generator(0, 0, 0))
    assert all(torch.equal(a, b) for a, b in zip(v, again))
    other = aug(x, make_generator(0, 0, 1))
    assert not torch.equal(v[0], other[0])
    # two ranks with half the batch each see exactly the views of one process with the whole batch
    a = aug(x[:4], make_generator(0, 0, 0), 8, 0)
    b = aug(x[4:], make_generator(0, 0, 0), 8, 4)
    assert all(torch.allclose(torch.cat([p, q]), r) for p, q, r in zip(a, b, v))


def test_augmentation_treats_channels_independently():
    x = torch.from_numpy(packaged_crops()[:6].astype(np.int32))
    y = x.clone()
    y[:, 1] = torch.flip(y[:, 1], dims=[-1])  # change channel 1 only
    aug = _aug()
    v, w = aug(x, make_generator(3, 1, 2)), aug(y, make_generator(3, 1, 2))
    for a, b in zip(v, w):
        assert torch.equal(a[:, 0], b[:, 0]) and torch.equal(a[:, 2], b[:, 2])
        assert not torch.equal(a[:, 1], b[:, 1])
    # brightness factors are drawn per channel: a crop with identical channels gets different ones
    same = x[:, :1].repeat(1, 3, 1, 1)
    out = _aug({"blur_p": (0.0, 0.0, 0.0), "solarize_p": 0.0, "brightness_p": 1.0})(same, make_generator(0, 0, 0))
    assert not torch.allclose(out[0][:, 0], out[0][:, 1])
    # one factor per view for all channels: identical channels stay identical, and the factors still vary per view
    over = {"blur_p": (0.0, 0.0, 0.0), "solarize_p": 0.0, "brightness_p": 1.0, "brightness_per_channel": False}
    shared = _aug(over)(same, make_generator(0, 0, 0))
    assert all(torch.equal(v[:, 0], v[:, 1]) and torch.equal(v[:, 0], v[:, 2]) for v in shared)
    assert not torch.allclose(shared[0], _aug({**over, "brightness_p": 0.0})(same, make_generator(0, 0, 0))[0])


def test_dataset_intensity_scaling_keeps_marker_levels():
    from scdino.training.augment import channel_stats, intensity_range

    x = torch.from_numpy(packaged_crops()[:8].astype(np.int32))
    lo, hi = intensity_range(x, (1.0, 99.0))
    px = x.transpose(0, 1).reshape(3, -1).double().numpy()
    np.testing.assert_allclose(lo.numpy(), np.percentile(px, 1.0, axis=1), rtol=1e-6)
    np.testing.assert_allclose(hi.numpy(), np.percentile(px, 99.0, axis=1), rtol=1e-6)
    assert torch.equal(
        intensity_range(x, (1.0, 99.0), max_crops=4, seed=1)[0], intensity_range(x, (1.0, 99.0), 4, 1)[0]
    )
    mean_fixed, _ = channel_stats(x, scale_lo=lo, scale_hi=hi)
    assert not torch.allclose(mean_fixed, channel_stats(x)[0])
    # a crop and the same crop at a quarter of the brightness: alike under per-crop min-max, not under a fixed range
    bright, dim = x[:1], x[:1] // 4
    off = {"blur_p": (0.0, 0.0, 0.0), "solarize_p": 0.0, "brightness_p": 0.0}
    a, b = _aug(off)(bright, make_generator(0, 0, 0)), _aug(off)(dim, make_generator(0, 0, 0))
    assert float((a[0] - b[0]).abs().max()) < 0.02
    aug = _aug(off)
    aug.scale_lo, aug.scale_hi = lo, hi
    a, b = aug(bright, make_generator(0, 0, 0)), aug(dim, make_generator(0, 0, 0))
    assert all(float(v.min()) >= 0 and float(v.max()) <= 1 for v in a + b)
    assert all(float(u.mean()) < 0.3 * float(v.mean()) for u, v in zip(b, a))
    with pytest.raises(ConfigError, match="intensity_scaling"):
        build_config(None, ["intensity_scaling=image"], data="d", out="o")
    with pytest.raises(ConfigError, match="intensity_percentiles"):
        build_config(None, ["intensity_percentiles=99,1"], data="d", out="o")


def test_centred_views_keep_the_cell_centre():
    from scdino.training.augment import crop_params

    for scale in ((0.05, 0.4), (0.4, 1.0)):
        free = crop_params(make_generator(0, 0, 0), 4000, scale, "cpu")
        w, h, cx, cy = crop_params(make_generator(0, 0, 0), 4000, scale, "cpu", centred=True).unbind(1)
        assert torch.equal(free[:, :2], torch.stack([w, h], 1))  # same sizes, only the positions are constrained
        assert bool((cx.abs() <= w / 2 + 1e-6).all() and (cy.abs() <= h / 2 + 1e-6).all())
        assert bool((cx.abs() + w <= 1 + 1e-6).all() and (cy.abs() + h <= 1 + 1e-6).all())  # inside the image
        assert float((cx.abs() / torch.minimum(1 - w, w / 2).clamp(min=1e-6)).max()) > 0.9  # and still spread
        fw, fcx = free[:, 0], free[:, 2]
        if scale[1] < 0.5:  # free local views often miss the centre; centred ones never do
            assert bool((fcx.abs() > fw).any())


def test_rotated_views_are_rotations_of_the_crop_and_rotation_is_off_by_default():
    from scdino.training.augment import _affine

    x = torch.arange(2 * 8 * 8, dtype=torch.float32).view(1, 2, 8, 8)  # no symmetry
    box = torch.tensor([[1.0, 1.0, 0.0, 0.0]])
    no = torch.tensor([False])
    for quarter in (1, 2, 3):
        theta = _affine(box, no, no, torch.tensor([quarter * torch.pi / 2]))
        grid = F.affine_grid(theta, [1, 2, 8, 8], align_corners=False)
        y = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
        assert any(torch.allclose(y, torch.rot90(x, k, (2, 3)), atol=1e-4) for k in (quarter, -quarter))
    assert torch.equal(_affine(box, no, no), _affine(box, no, no, torch.tensor([0.0])))
    assert TrainConfig.rotation == 0  # the recipe's views are unchanged unless rotation is asked for
    crops = torch.from_numpy(packaged_crops()[:4].astype(np.float32))
    mean, std = torch.zeros(3), torch.ones(3)
    cfg = TrainConfig(data="x", out="y", global_size=32, local_size=16, local_crops=2, rotation=180)
    a = MultiCrop(cfg, mean, std)(crops, make_generator(0, 0, 0))
    b = MultiCrop(TrainConfig(**{**cfg.to_dict(), "rotation": 0.0}), mean, std)(crops, make_generator(0, 0, 0))
    assert not torch.allclose(a[0], b[0])
    with pytest.raises(ConfigError, match="rotation 200"):
        TrainConfig(data="x", out="y", rotation=200).validate()


def test_gaussian_blur_matches_direct_convolution():
    x = torch.rand(2, 1, 20, 20)
    y = gaussian_blur(x, torch.tensor([1.0, 1.5]), torch.tensor([True, False]))
    assert torch.equal(y[1], x[1])
    r = 5  # ceil(3 * 1.5)
    t = torch.arange(-r, r + 1, dtype=torch.float32)
    k = torch.exp(-0.5 * (t / 1.0) ** 2)
    k = k / k.sum()
    k2 = k[:, None] * k[None, :]
    ref = F.conv2d(F.pad(x[:1], (r, r, r, r), mode="reflect"), k2[None, None])
    torch.testing.assert_close(y[:1], ref, atol=1e-5, rtol=1e-5)


def test_dino_loss_against_the_direct_formula():
    torch.manual_seed(0)
    n_crops, b, d = 4, 3, 5
    s, t = torch.randn(n_crops * b, d), torch.randn(2 * b, d)
    loss = DINOLoss(d, n_crops, 0.04, 0.04, 0, 10, student_temp=0.1, center_momentum=0.9)
    loss.center.fill_(0.2)
    got = loss(s, t, epoch=0)
    total, terms = 0.0, 0
    for iq in range(2):
        q = torch.softmax((t[iq * b : (iq + 1) * b] - 0.2) / 0.04, -1)
        for v in range(n_crops):
            if v == iq:
                continue
            p = torch.log_softmax(s[v * b : (v + 1) * b] / 0.1, -1)
            total += (-(q * p).sum(-1)).mean()
            terms += 1
    torch.testing.assert_close(got, total / terms)
    torch.testing.assert_close(loss.center, 0.2 * 0.9 + 0.1 * t.mean(0, keepdim=True))
    warm = DINOLoss(d, 2, 0.04, 0.07, 3, 10)
    assert np.allclose(warm.teacher_temp_schedule[:4], [0.04, 0.055, 0.07, 0.07])


def test_schedules():
    s = cosine_scheduler(1.0, 0.1, epochs=4, niter_per_ep=5, warmup_epochs=1)
    assert len(s) == 20 and s[0] == 0.0 and np.isclose(s[4], 1.0) and np.isclose(s[5], 1.0)
    assert np.isclose(s[-1], 0.1 + 0.45 * (1 + np.cos(np.pi * 14 / 15))) and np.all(np.diff(s[5:]) <= 0)
    m = cosine_scheduler(0.996, 1.0, 10, 3)
    assert np.isclose(m[0], 0.996) and m[-1] < 1.0 and np.all(np.diff(m) >= 0)


def _ckpt(path):
    return torch.load(path, map_location="cpu", weights_only=False)


def test_resume_equals_uninterrupted(crop_store, tmp_path, monkeypatch):
    full = tmp_path / "full"
    train(cfg_for(crop_store, full, epochs=2))
    part = tmp_path / "part"
    real = loop_mod.epoch_order

    def stop_at_second_epoch(n, epoch, seed):
        if epoch == 1:
            raise KeyboardInterrupt
        return real(n, epoch, seed)

    monkeypatch.setattr(loop_mod, "epoch_order", stop_at_second_epoch)
    with pytest.raises(KeyboardInterrupt):
        train(cfg_for(crop_store, part, epochs=2))
    assert _ckpt(part / "checkpoint.pth")["epoch"] == 1
    monkeypatch.setattr(loop_mod, "epoch_order", real)
    train(cfg_for(crop_store, part, epochs=2))
    a, b = _ckpt(full / "checkpoint.pth"), _ckpt(part / "checkpoint.pth")
    assert a["epoch"] == b["epoch"] == 2
    for k in a["teacher"]:
        assert torch.equal(a["teacher"][k], b["teacher"][k]), k  # bit for bit on the CPU
    assert torch.equal(a["dino_loss"]["center"], b["dino_loss"]["center"])
    log = [json.loads(line) for line in (part / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log if r.get("summary")] == [1, 2]


@pytest.mark.slow
def test_checkpoint_layout_and_use_in_engine_and_export(crop_store, tmp_path):
    out = tmp_path / "run"
    t = time.perf_counter()
    s = train(cfg_for(crop_store, out, epochs=1))
    wall = time.perf_counter() - t
    # 48 crops in batches of 8: 6 whole batches, 48 crops seen in the epoch, and no faster than this call's wall time
    assert s["crops_per_s"] * s["seconds"] == pytest.approx(48)
    assert 0 < s["seconds"] <= wall and s["crops_per_s"] >= 48 / wall
    ck = _ckpt(out / "checkpoint.pth")
    assert set(ck) >= {"student", "teacher", "optimizer", "epoch", "args", "dino_loss", "fp16_scaler", "scdino"}
    assert all(k.startswith("module.") for k in ck["student"])
    assert any(k.startswith("backbone.") for k in ck["teacher"]) and "head.last_layer.weight_g" in ck["teacher"]
    assert ck["scdino"]["channels"] == ["CTIP2", "BRN2", "ROR"] and len(ck["scdino"]["mean"]) == 3
    assert (out / "checkpoint0001.pth").is_file() and json.loads((out / "config.json").read_text())["epochs"] == 1
    from scdino.engine.pipeline import RunConfig, run
    from scdino.export.onnx_export import export_onnx

    r = run(
        RunConfig(plate=crop_store, out=str(tmp_path / "e.zarr"), model=str(out / "checkpoint.pth"), progress=False)
    )
    assert r.n_cells == 48 and not r.untrained
    import anndata as ad

    prep = ad.read_zarr(tmp_path / "e.zarr").uns["scdino"]["preprocessing"]
    assert prep["input_size"] == 32 and np.allclose(prep["mean"], ck["scdino"]["mean"])
    meta = export_onnx(str(out / "checkpoint.pth"), tmp_path / "m.onnx", crop_size=32)
    assert meta["channels"] == ["CTIP2", "BRN2", "ROR"] and meta["verification"]["passed"]
    assert "scale_lo" not in ck["scdino"] and meta["preprocessing"]["steps"][1].startswith("minmax")


@pytest.fixture(scope="module")
def dataset_scaled_run(crop_store, tmp_path_factory):
    """One epoch with intensity_scaling=dataset: the run folder."""
    out = tmp_path_factory.mktemp("dataset_scaled") / "run"
    train(cfg_for(crop_store, out, epochs=1, intensity_scaling="dataset", intensity_percentiles="0.5,99.5"))
    return out


def test_dataset_scaled_model_stores_its_range(dataset_scaled_run):
    from scdino.models import load_model

    ck = _ckpt(dataset_scaled_run / "checkpoint.pth")["scdino"]
    assert len(ck["scale_lo"]) == 3 and all(h > lo for lo, h in zip(ck["scale_lo"], ck["scale_hi"]))
    lm = load_model(str(dataset_scaled_run / "checkpoint.pth"), 3)
    assert lm.prep.scale_lo == tuple(ck["scale_lo"]) and lm.prep.scale_hi == tuple(ck["scale_hi"])


def test_dataset_scaled_model_in_the_engine_warns_on_a_plate_out_of_range(
    dataset_scaled_run, crop_store, tmp_path, caplog
):
    import anndata as ad

    from scdino.engine.pipeline import RunConfig, run

    out = dataset_scaled_run
    ck = _ckpt(out / "checkpoint.pth")["scdino"]
    run(RunConfig(plate=crop_store, out=str(tmp_path / "e.zarr"), model=str(out / "checkpoint.pth"), progress=False))
    prep = ad.read_zarr(tmp_path / "e.zarr").uns["scdino"]["preprocessing"]
    assert np.allclose(prep["scale_hi"], ck["scale_hi"])
    assert "fixed intensity range" not in caplog.text  # the plate it was trained on fits its range
    # the same model with a range 100x too bright for this plate: the run says so, naming the channels
    bright = _ckpt(out / "checkpoint.pth")
    bright["scdino"]["scale_hi"] = [100 * v for v in bright["scdino"]["scale_hi"]]
    torch.save(bright, tmp_path / "bright.pth")
    run(RunConfig(plate=crop_store, out=str(tmp_path / "b.zarr"), model=str(tmp_path / "bright.pth"), progress=False))
    assert all(f"channel {c}: 99% of pixels" in caplog.text for c in ("CTIP2", "BRN2", "ROR"))


def test_dataset_scaled_model_exports_its_range_into_the_graph(dataset_scaled_run, tmp_path):
    from scdino.export.onnx_export import export_onnx
    from scdino.models import load_model

    out = dataset_scaled_run
    ck = _ckpt(out / "checkpoint.pth")["scdino"]
    lm = load_model(str(out / "checkpoint.pth"), 3)
    # the exported graph scales by the stored range: ONNX Runtime matches PyTorch on real crops, and differs from
    # what the same weights give with per-crop min-max
    meta = export_onnx(str(out / "checkpoint.pth"), tmp_path / "m.onnx", crop_size=32)
    assert meta["verification"]["passed"] and meta["preprocessing"]["scale_lo"] == ck["scale_lo"]
    import onnxruntime as ort

    crops = packaged_crops()[:4, :, 8:40, 8:40]
    got = ort.InferenceSession(str(tmp_path / "m.onnx")).run(None, {"crops": crops})[0]
    from scdino.preprocess import apply, preprocess

    with torch.inference_mode():
        want = lm.model(apply(torch.from_numpy(crops.astype(np.float32)), lm.prep)).numpy()
        minmax = lm.model(preprocess(torch.from_numpy(crops.astype(np.float32)), 32, lm.prep.mean, lm.prep.std))
    np.testing.assert_allclose(got, want, atol=1e-4)
    assert float(np.abs(minmax.numpy() - want).max()) > 1e-2
    with pytest.raises(ConfigError, match="--dtype uint8 crops reach only 255"):
        export_onnx(str(out / "checkpoint.pth"), tmp_path / "u8.onnx", crop_size=32, dtype="uint8")


def test_dataset_scaled_run_resumes_only_with_its_range(dataset_scaled_run, crop_store, tmp_path):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(dataset_scaled_run, out)
    # resuming with another scaling would make the stored range lie about the earlier epochs
    with pytest.raises(ConfigError, match="intensity_scaling 'dataset' -> 'crop'"):
        train(cfg_for(crop_store, out, epochs=2), extend=True)
    # a folder whose config.json is gone (an older run's layout) is still held to its checkpoint's range
    (out / "config.json").unlink()
    with pytest.raises(ConfigError, match="trained with intensity scaling range"):
        train(cfg_for(crop_store, out, epochs=2))


def test_evaluate_holds_a_dataset_scaled_model_to_fixed_range_baselines(dataset_scaled_run, crop_store, tmp_path):
    from scdino.engine.evaluate import evaluate

    out = dataset_scaled_run
    # evaluate holds the model to baselines that keep absolute levels too, and plots epochs against them
    r = evaluate(
        crop_store,
        [str(out / "checkpoint.pth")],
        [("CTIP2", "BRN2", "ROR")],
        str(tmp_path / "report"),
        input_size=32,
        run_dir=str(out),
        baseline_arch="vit_test8",
        progress=False,
    )
    assert r["columns"][-2:] == ["untrained vit_test8, fixed range", "raw pixels, fixed range"]
    assert (tmp_path / "report" / "epochs.png").is_file()
    # the fixed-range raw-pixel baseline, from its definition: each channel scaled by the checkpoint's stored range,
    # clipped to [0, 1], flattened; its accuracy is scikit-learn's vote on those pixels
    from conftest import sklearn_knn_top1
    from scdino.cells.cropstore import CropStore

    ck = _ckpt(out / "checkpoint.pth")["scdino"]
    lo, hi = (np.asarray(ck[k], np.float64)[None, :, None, None] for k in ("scale_lo", "scale_hi"))
    store = CropStore(crop_store)
    table = store.table()
    px = store.read(np.arange(len(table)), [0, 1, 2]).astype(np.float64)
    flat = np.clip((px - lo) / (hi - lo), 0, 1).reshape(len(px), -1)
    want = sklearn_knn_top1(flat, table["class"].astype(str).to_numpy(), k=20)
    assert r["top1"][0][-1] == pytest.approx(want)


def test_dataset_scaling_rejects_an_empty_channel_range(crop_store, tmp_path, monkeypatch):
    def one_empty(raw, percentiles, max_crops=2048, seed=0):
        return torch.tensor([0.0, 5.0, 0.0]), torch.tensor([100.0, 5.0, 100.0])

    monkeypatch.setattr(loop_mod, "intensity_range", one_empty)
    with pytest.raises(ConfigError, match="channel\\(s\\) BRN2 have the same value"):
        train(cfg_for(crop_store, tmp_path / "e", intensity_scaling="dataset"))
    with pytest.raises(ConfigError, match="expected two values"):
        build_config(None, ["intensity_percentiles=99"], data="d", out="o")


@pytest.mark.slow
def test_a_few_steps_reduce_the_loss_on_real_crops(crop_store, tmp_path):
    out = tmp_path / "fit"
    # with the teacher held at its initial weights and a fast centre the targets settle within the first epoch;
    # what is left is the student learning them (lr 0.1 x batch 8 / 256 = 3.1e-3). Blur and solarisation are off:
    # they have their own tests, and the student learns the same in half the epochs at a fifth of the time
    kw = dict(lr=0.1, warmup_epochs=0, momentum_teacher=1.0, center_momentum=0.5, blur_p="0,0,0", solarize_p=0)
    train(cfg_for(crop_store, out, epochs=4, **kw))
    ep = [json.loads(line)["loss"] for line in (out / "log.jsonl").read_text().splitlines() if '"summary"' in line]
    assert ep[-1] < ep[0] - 0.5 and ep[-1] < ep[1] - 0.2, ep


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(crop_store, tmp_path, monkeypatch):
    out = tmp_path / "nan"
    train(cfg_for(crop_store, out, epochs=1))
    good = (out / "checkpoint.pth").read_bytes()
    monkeypatch.setattr(DINOLoss, "forward", lambda self, s, t, e: (s.sum() + t.sum()) * float("nan"))
    with pytest.raises(TrainingDiverged, match="diverged.*last good checkpoint"):
        train(cfg_for(crop_store, out, epochs=2), extend=True)
    assert (out / "checkpoint.pth").read_bytes() == good


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_torchrun_two_processes_match_one(crop_store, tmp_path):
    """gloo DDP with batch 8 per process == one process with batch 16 (same global batch)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    common = [
        "--data",
        crop_store,
        "--arch",
        "vit_test",
        "--patch",
        "8",
        "--epochs",
        "1",
        "--device",
        "cpu",
        *[a for s in TINY for a in ("--set", s)],
        "--set",
        "threads=1",
    ]
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc-per-node",
            "2",
            "--master-port",
            str(_free_port()),
            "-m",
            "scdino.training",
            "--out",
            str(tmp_path / "ddp"),
            "--batch-size-per-device",
            "8",
            *common,
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    p1 = subprocess.run(
        [
            sys.executable,
            "-m",
            "scdino.training",
            "--out",
            str(tmp_path / "one"),
            "--batch-size-per-device",
            "16",
            *common,
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p1.returncode == 0, p1.stderr[-3000:]
    a, b = _ckpt(tmp_path / "ddp" / "checkpoint.pth"), _ckpt(tmp_path / "one" / "checkpoint.pth")
    assert a["args"].batch_size_per_device == 8 and b["args"].batch_size_per_device == 16
    for k in a["teacher"]:
        torch.testing.assert_close(a["teacher"][k], b["teacher"][k], rtol=1e-4, atol=1e-5)
    for k in a["student"]:
        torch.testing.assert_close(a["student"][k], b["student"][k], rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(a["dino_loss"]["center"], b["dino_loss"]["center"], rtol=1e-4, atol=1e-6)


def test_knn_monitoring_logs_what_the_engine_would_measure(crop_store, tmp_path):
    """The logged k-NN equals scikit-learn's vote on the embeddings scdino-engine run writes for the final teacher."""
    import anndata as ad

    from conftest import sklearn_knn_top1
    from scdino.engine.pipeline import RunConfig, run

    out = tmp_path / "mon"
    train(cfg_for(crop_store, out, epochs=2, val_data=crop_store, knn_freq=1, intensity_scaling="dataset"))
    logged = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines() if '"summary"' in line]
    assert [("knn_top1" in r) for r in logged] == [True, True]
    run(RunConfig(plate=crop_store, out=str(tmp_path / "e.zarr"), model=str(out / "checkpoint.pth"), progress=False))
    a = ad.read_zarr(tmp_path / "e.zarr")
    want = sklearn_knn_top1(a.obsm["X_scdino"], a.obs["class"].astype(str).to_numpy(), k=20)
    assert logged[-1]["knn_top1"] == pytest.approx(want, abs=1e-9)


def test_one_line_per_epoch_and_one_epoch_numbering_in_the_log(crop_store, tmp_path, caplog):
    import logging

    caplog.set_level(logging.INFO, logger="scdino")
    out = tmp_path / "lines"
    train(cfg_for(crop_store, out, epochs=2, val_data=crop_store, knn_freq=1))
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("epoch ")]
    assert [ln.split(":")[0] for ln in lines] == ["epoch 1/2", "epoch 2/2"]
    assert all("loss" in ln and "lr" in ln and "crops/s" in ln and "k-NN top-1" in ln and "left" in ln for ln in lines)
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    steps = {r["epoch"] for r in log if "iteration" in r}
    assert steps == {r["epoch"] for r in log if r.get("summary")} == {1, 2}  # the same numbering everywhere


def test_resuming_a_damaged_checkpoint_names_the_last_good_one(crop_store, tmp_path):
    from scdino.errors import CheckpointError

    out = tmp_path / "dmg"
    train(cfg_for(crop_store, out, epochs=2))
    data = (out / "checkpoint.pth").read_bytes()
    (out / "checkpoint.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(
        CheckpointError, match="checkpoint0002.pth: copy it to .*checkpoint.pth to resume after epoch 2"
    ):
        train(cfg_for(crop_store, out, epochs=3), extend=True)


def test_a_plate_config_still_trains_on_a_crop_store(crop_store, tmp_path, caplog):
    # config.json files of older versions record crop_size 64 (then the default) whatever the data
    train(cfg_for(crop_store, tmp_path / "old", epochs=1, crop_size=64))
    assert "crop_size do not apply and are ignored" in caplog.text
    assert (tmp_path / "old" / "checkpoint.pth").is_file()


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_one_training_step_matches_dino_written_from_its_definition(tmp_path, precision):
    """Loss, student gradients, teacher EMA and centre of one step of the trainer against the float64 oracle
    (``tests/dino_oracle.py``) on the same weights and views, with local crops (DINO's position-embedding
    interpolation); bf16 autocast (``precision=auto`` on CPUs with native bf16) within bf16 tolerance."""
    import copy

    import dino_oracle

    from scdino.training.data import epoch_order

    cfg = build_config(
        None,
        TINY + ["clip_grad=0", "freeze_last_layer=0", "momentum_teacher=0.9", f"precision={precision}", "out_dim=64"],
        data="crops",
        out=str(tmp_path / "run"),
        arch="vit_test",
        patch=8,
        epochs=1,
        batch_size_per_device=4,
        device="cpu",
    )
    crops = torch.from_numpy(packaged_crops()[:8, :, 8:40, 8:40].astype(np.int32))
    tr = loop_mod.build(cfg, loop_mod.data_from_crops(cfg, crops, ["a", "b", "c"]))
    tr.loss_fn.center.normal_(0, 0.1)  # a non-zero centre, as after a few steps
    student0, teacher0 = copy.deepcopy(tr.student.state_dict()), copy.deepcopy(tr.teacher.state_dict())
    center0 = tr.loss_fn.center.clone()
    order = epoch_order(len(crops), 0, cfg.seed)
    views = tr.augment(crops[order[:4]], make_generator(cfg.seed, 0, 0), 4, 0)
    assert [v.shape[-1] for v in views] == [32, 32, 16, 16]
    loss = loop_mod._step(tr, 0, 0, order, None)
    o_loss, o_grads, o_teacher, o_center, o_more = dino_oracle.step(
        student0,
        teacher0,
        center0,
        views,
        heads=2,
        teacher_temp=cfg.teacher_temp,
        student_temp=cfg.student_temp,
        center_momentum=cfg.center_momentum,
    )
    tol = {"fp32": 1e-5, "bf16": 2e-2}[precision]
    assert abs(loss - float(o_loss)) <= tol * abs(float(o_loss))
    got = {n: p.grad for n, p in tr.student.named_parameters() if p.grad is not None}
    assert set(got) == {n for n in o_grads if n != "head.last_layer.weight_g"}  # g is fixed (norm_last_layer)
    flat = lambda d: torch.cat([d[n].flatten().double() for n in sorted(got)])
    g, o = flat(got), flat(o_grads)
    if precision == "fp32":
        for n in got:
            scale = float(o_grads[n].abs().max())
            torch.testing.assert_close(got[n].double(), o_grads[n], rtol=1e-3, atol=1e-4 * scale)
    else:
        assert float(F.cosine_similarity(g, o, dim=0)) > 0.99
        assert abs(float(g.norm() / o.norm()) - 1) < 0.05
    torch.testing.assert_close(
        tr.loss_fn.center.double(), o_center, rtol=tol, atol=1e-3 if precision == "bf16" else 1e-7
    )
    # the monitored values of this step, from the definitions: entropy of each cell's target and of their mean, KL
    # from each target to each other view's student distribution, spread of the teacher's L2-normalised embeddings
    q = torch.softmax((o_teacher - center0.double()) / cfg.teacher_temp, -1)
    h_cell = float(-(q * q.log()).sum(-1).mean())
    qm = q.mean(0)
    h_mean = float(-(qm * qm.log()).sum())
    kls = []
    for iq, qv in enumerate(q.chunk(2)):
        for iv, sv in enumerate(o_more["student"]):
            if iv != iq:
                kls.append(float((qv * (qv.log() - torch.log_softmax(sv / cfg.student_temp, -1))).sum(-1).mean()))
    e = o_more["teacher_cls"] / o_more["teacher_cls"].norm(dim=-1, keepdim=True)
    spread = float(e.std(0).mean()) * e.shape[1] ** 0.5
    want = [h_cell, h_mean, sum(kls) / len(kls), spread]
    got_stats = tr.stats.tolist()
    for name, g_, w_ in zip(loop_mod.MONITORED, got_stats, want):
        assert abs(g_ - w_) <= (tol * 5 + 1e-5) * max(1.0, abs(w_)), (name, g_, w_)
    m = 0.9  # the first step's teacher momentum
    student1 = tr.student.state_dict()
    for n, t in tr.teacher.state_dict().items():
        torch.testing.assert_close(t, m * teacher0[n] + (1 - m) * student1[n], rtol=1e-6, atol=1e-7)


def test_random_resized_boxes_fit_the_crop_and_keep_their_drawn_aspect():
    from scdino.training.augment import crop_params

    g = torch.Generator().manual_seed(0)
    box = crop_params(g, 4000, (0.3, 1.0), "cpu")
    w, h = box[:, 0], box[:, 1]
    assert (w <= 1).all() and (h <= 1).all()
    ratio = w / h  # torchvision's rule: a box that fits, or the whole crop; never a clamped, stretched one
    whole = (w == 1) & (h == 1)
    assert ((ratio >= 3 / 4 - 1e-6) & (ratio <= 4 / 3 + 1e-6) | whole).all()
    big = crop_params(torch.Generator().manual_seed(0), 4000, (0.95, 1.0), "cpu")  # few of these boxes fit
    assert (big[:, :2] <= 1).all() and ((big[:, 0] == 1) & (big[:, 1] == 1)).float().mean() > 0.05
    sq = crop_params(torch.Generator().manual_seed(0), 1000, (0.3, 1.0), "cpu", ratio=(1.0, 1.0))
    torch.testing.assert_close(sq[:, 0], sq[:, 1])
    area = sq[:, 0] * sq[:, 1]
    assert area.min() >= 0.3 - 1e-6 and area.max() <= 1 + 1e-6


def test_dino_head_last_layer_starts_as_nn_linear():
    from scdino.training.dino import DINOHead

    torch.manual_seed(0)
    v = DINOHead(192, out_dim=8192, hidden=64, bottleneck=256).last_layer.weight_v
    bound = 1 / 256**0.5  # nn.Linear's default: uniform(-1/sqrt(in), 1/sqrt(in))
    assert float(v.abs().max()) <= bound and float(v.abs().max()) > 0.99 * bound
    assert abs(float(v.std()) - bound / 3**0.5) < 0.01 * bound


def test_precision_auto_is_bf16_only_where_the_cpu_has_it(monkeypatch):
    cfg = build_config(None, [], data="d", out="o")
    cpu = torch.device("cpu")
    monkeypatch.setattr(loop_mod, "has_native_bf16", lambda: True)
    assert loop_mod._precision(cfg, cpu) == torch.bfloat16
    monkeypatch.setattr(loop_mod, "has_native_bf16", lambda: False)
    assert loop_mod._precision(cfg, cpu) is None
    assert loop_mod._precision(build_config(None, ["precision=fp32"], data="d", out="o"), cpu) is None
    with pytest.raises(ConfigError, match="fp16 is for GPUs"):
        loop_mod._precision(build_config(None, ["precision=fp16"], data="d", out="o"), cpu)


def test_health_names_uniform_and_one_cluster_collapse_and_a_flat_teacher():
    cfg = build_config(None, ["out_dim=4096", "warmup_epochs=2", "epochs=10"], data="d", out="o")
    ln_k = np.log(4096)
    first = {"epoch": 1, "teacher_entropy": 7.1, "teacher_mean_entropy": 8.0}
    at = lambda epoch, h, hm: {"epoch": epoch, "teacher_entropy": h, "teacher_mean_entropy": hm}
    assert "uniform collapse" in loop_mod.health(at(5, ln_k - 0.01, ln_k - 0.001), first, cfg)[0]
    assert "one-cluster collapse" in loop_mod.health(at(5, 0.01, 0.02), first, cfg)[0]
    assert "has not sharpened" in loop_mod.health(at(5, 7.0, 8.0), first, cfg)[0]
    assert loop_mod.health(at(2, 7.0, 8.0), first, cfg) == []  # still warming up
    assert loop_mod.health(at(5, 2.0, 6.5), first, cfg) == []  # sharpened, spread over many outputs


def test_every_epoch_reports_what_the_teacher_does(crop_store, tmp_path):
    out = tmp_path / "mon"
    train(cfg_for(crop_store, out, epochs=1))
    (rec,) = [json.loads(ln) for ln in (out / "log.jsonl").read_text().splitlines() if '"summary"' in ln]
    ln_k = np.log(128)
    assert 0 < rec["teacher_entropy"] <= ln_k + 1e-6 and 0 < rec["teacher_mean_entropy"] <= ln_k + 1e-6
    assert rec["teacher_mean_entropy"] >= rec["teacher_entropy"] - 1e-6  # concavity: H(mean q) >= mean H(q)
    assert rec["kl"] >= -1e-6 and 0 < rec["embedding_spread"] and "warnings" in rec


def test_a_run_folder_keeps_its_settings_and_extends_only_on_request(crop_store, tmp_path):
    from scdino.training import record

    out = tmp_path / "record"
    train(cfg_for(crop_store, out, epochs=1))
    config_before = (out / "config.json").read_text()
    ckpt_before = (out / "checkpoint.pth").read_bytes()
    # another lr, another architecture, another data: refused before anything is written, each key named
    with pytest.raises(ConfigError, match=r"lr 0\.0005 -> 0\.001.*--config .*config\.json"):
        train(cfg_for(crop_store, out, epochs=1, lr=0.001))
    with pytest.raises(ConfigError, match="head_hidden 64 -> 32"):
        train(cfg_for(crop_store, out, epochs=1, head_hidden=32))
    # more epochs without --extend: refused, and the message names --extend
    with pytest.raises(ConfigError, match=r"epochs 1 -> 2.*--extend"):
        train(cfg_for(crop_store, out, epochs=2))
    assert (out / "config.json").read_text() == config_before
    assert (out / "checkpoint.pth").read_bytes() == ckpt_before
    # the same settings: nothing to do, said so
    assert train(cfg_for(crop_store, out, epochs=1)) == {"nothing_to_do": True, "epoch": 1, "epochs": 1}
    # free settings (threads, checkpoint frequency) may change
    assert train(cfg_for(crop_store, out, epochs=1, threads=1, saveckp_freq=0))["nothing_to_do"]
    # an explicit extension trains on, recorded in the history; config.json keeps the original settings
    s = train(cfg_for(crop_store, out, epochs=2), extend=True)
    assert s["epoch"] == 2 and (out / "config.json").read_text() == config_before
    events = [(r["event"], r["epochs"]) for r in record.history(out)]
    assert events == [("start", 1), ("resume", 1), ("resume", 1), ("extend", 2)]
    assert record.run_settings(out)["epochs"] == 2
    assert train(cfg_for(crop_store, out, epochs=2))["nothing_to_do"]  # the extended run resumes as itself
    with pytest.raises(ConfigError, match="--extend needs more --epochs than the run's 2"):
        train(cfg_for(crop_store, out, epochs=2), extend=True)


def test_a_folder_without_checkpoints_takes_new_settings(crop_store, tmp_path):
    out = tmp_path / "restart"
    out.mkdir()
    (out / "config.json").write_text(json.dumps({"lr": 1.0}))  # a run that stopped before its first checkpoint
    from scdino.outputs import mark

    mark(out, "scdino-train")
    train(cfg_for(crop_store, out, epochs=1))
    assert json.loads((out / "config.json").read_text())["lr"] == 0.0005


def test_bad_values_in_set_and_config_files_are_one_line_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"lr='abc': expected a number"):
        build_config(None, ["lr=abc"], data="d", out="o")
    with pytest.raises(ConfigError, match=r"epochs='two': expected a whole number"):
        build_config(None, ["epochs=two"], data="d", out="o")
    with pytest.raises(ConfigError, match=r"global_scale='a,b': expected numbers"):
        build_config(None, ["global_scale=a,b"], data="d", out="o")
    bad = tmp_path / "bad.yaml"
    bad.write_text("lr: [1, 2\nepochs: 3\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        build_config(str(bad), [], data="d", out="o")
    with pytest.raises(ConfigError, match=r"warmup_epochs 5 cannot exceed epochs \(2\).*--set warmup_epochs=N"):
        build_config(None, ["warmup_epochs=5", "epochs=2"], data="d", out="o")


def test_older_run_folders_resume_and_broken_records_are_one_line_errors(crop_store, tmp_path):
    from scdino.errors import CheckpointError

    out = tmp_path / "old"
    train(cfg_for(crop_store, out, epochs=1))
    cfg = json.loads((out / "config.json").read_text())
    del cfg["aspect_ratio"]  # written by a version before the setting existed: its default is what that run used
    (out / "config.json").write_text(json.dumps(cfg))
    assert train(cfg_for(crop_store, out, epochs=1))["nothing_to_do"]
    (out / "history.jsonl").write_text((out / "history.jsonl").read_text() + '{"event": "res')  # cut short
    with pytest.raises(ConfigError, match=r"history.jsonl:3: not a JSON record"):
        train(cfg_for(crop_store, out, epochs=1))
    # only a numbered checkpoint left: never trained over from epoch 0
    only = tmp_path / "numbered"
    train(cfg_for(crop_store, only, epochs=1))
    (only / "checkpoint.pth").unlink()
    before = (only / "checkpoint0001.pth").read_bytes()
    with pytest.raises(
        CheckpointError, match="checkpoint0001.pth: copy it to .*checkpoint.pth to resume after epoch 1"
    ):
        train(cfg_for(crop_store, only, epochs=2), extend=True)
    assert (only / "checkpoint0001.pth").read_bytes() == before


def test_a_resumed_run_is_judged_against_its_own_first_epoch(crop_store, tmp_path, monkeypatch):
    out = tmp_path / "judge"
    train(cfg_for(crop_store, out, epochs=1))
    log = out / "log.jsonl"
    log.write_text("\n".join(ln for ln in log.read_text().splitlines() if '"summary"' not in ln) + "\n")  # no baseline
    seen = []
    real = loop_mod.health
    monkeypatch.setattr(loop_mod, "health", lambda s, first, cfg: seen.append(first) or real(s, first, cfg))
    train(cfg_for(crop_store, out, epochs=4), extend=True)
    assert seen == [None, None, None]  # not compared with itself: not judged at all
