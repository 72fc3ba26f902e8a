import importlib.metadata as md

import anndata as ad
import numpy as np
import onnx
import pytest
import torch

import scdino.cpu
from conftest import dino_full_checkpoint
from scdino.cells.options import CellOptions
from scdino.data import packaged_crops
from scdino.engine import backends
from scdino.engine.backends import onnxruntime_backend as ortb
from scdino.engine.pipeline import RunConfig, run
from scdino.errors import CheckpointError, ConfigError
from scdino.export.onnx_export import export_onnx
from scdino.export.quantize import DYNAMIC_FORMS, FAST_FORM_MIN_COSINE, dynamic_forms, quantize
from scdino.export.verify import VerificationError, compare, edge_cases, fit_crops
from scdino.models import load_model
from scdino.models.card import ModelCard, model_format
from scdino.models.plan import check_plan
from scdino.models.sidecar import read_sidecar
from scdino.preprocess import Preprocessing, apply


def _ort(path):
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _torch(lm, crops):
    with torch.inference_mode():
        return lm.model(apply(torch.from_numpy(crops.astype(np.float32)), lm.prep)).numpy()


@pytest.mark.parametrize("dtype", ["uint16", "uint8", "float32"])
def test_onnx_parity_per_dtype(tmp_path, dtype):
    out = tmp_path / "m.onnx"
    meta = export_onnx("random:vit_test16", out, n_channels=2, crop_size=40, input_size=64, dtype=dtype)
    assert meta["verification"]["passed"] and meta["verification"]["min_cosine"] > 0.99999
    g = onnx.load(out)
    assert g.graph.input[0].type.tensor_type.elem_type == {"uint16": 4, "uint8": 2, "float32": 1}[dtype]
    assert g.opset_import[0].version >= 17
    ops = {n.op_type for n in g.graph.node}
    assert "LayerNormalization" in ops  # one op, not a decomposition
    for n in g.graph.node:
        if n.op_type == "Resize":  # only the bilinear input resize; no bicubic position-embedding resize
            assert onnx.helper.get_attribute_value(next(a for a in n.attribute if a.name == "mode")) == b"linear"
    lm = load_model("random:vit_test16", 2, 64)
    crops = fit_crops(packaged_crops(), 2, 40, dtype)
    for batch in (crops[:1], crops[:7], edge_cases(crops)):  # dynamic batch, constant and saturated channels
        d, cmin = compare(_ort(out).run(None, {"crops": batch})[0], _torch(lm, batch))
        assert d < 1e-4 and cmin > 0.99999
    side = read_sidecar(out)
    for key in (
        "arch",
        "patch_size",
        "crop_size",
        "input_size",
        "channels",
        "preprocessing",
        "embed_dim",
        "checkpoint_sha256",
        "opset",
        "verification",
    ):
        assert key in side


@pytest.mark.slow
def test_adapted_vits16_checkpoint_parity_and_attention(tmp_path):
    ckpt = tmp_path / "dino.pth"
    dino_full_checkpoint(ckpt, arch="vit_small16", in_chans=3)
    out = tmp_path / "s.onnx"
    meta = export_onnx(
        str(ckpt), out, channels=("BF", "DAPI", "GFP", "PE", "APC"), crop_size=50, input_size=112, attention=True
    )
    assert meta["adaptation"] == "mean" and meta["channels"] == ["BF", "DAPI", "GFP", "PE", "APC"]
    assert meta["checkpoint_sha256"] and meta["verification"]["min_cosine"] > 0.99999
    lm = load_model(str(ckpt), 5, 112)
    crops = fit_crops(packaged_crops()[:6], 5, 50, "uint16")
    cls, att = _ort(out).run(None, {"crops": crops})
    with torch.inference_mode():
        want_cls, want_att = lm.model.forward_with_attention(apply(torch.from_numpy(crops.astype(np.float32)), lm.prep))
    assert att.shape == (6, 6, 49)
    np.testing.assert_allclose(cls, want_cls.numpy(), atol=1e-4)
    np.testing.assert_allclose(att, want_att.numpy(), atol=1e-5)


def test_fp16_export_keeps_accuracy(tmp_path):
    meta = export_onnx(
        "random:vit_test16", tmp_path / "h.onnx", n_channels=3, crop_size=32, input_size=64, precision="fp16"
    )
    assert meta["verification"]["min_cosine"] >= 0.999
    g = onnx.shape_inference.infer_shapes(onnx.load(tmp_path / "h.onnx"))
    types = {v.name: v.type.tensor_type.elem_type for v in [*g.graph.value_info, *g.graph.input, *g.graph.output]}
    types.update({t.name: t.data_type for t in g.graph.initializer})
    FLOAT, FLOAT16 = onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16
    ln = [n for n in g.graph.node if n.op_type == "LayerNormalization"]
    assert ln and all(types[i] == FLOAT for n in ln for i in n.input)  # LayerNorm in fp32
    mm = [n for n in g.graph.node if n.op_type == "MatMul"]
    assert mm and all(types[i] == FLOAT16 for n in mm for i in n.input)  # the rest in fp16
    assert types["cls"] == FLOAT


def test_failed_verification_writes_nothing(tmp_path):
    out = tmp_path / "bad.onnx"
    with pytest.raises(VerificationError, match="differs from PyTorch"):
        export_onnx(
            "random:vit_test16",
            out,
            n_channels=2,
            crop_size=32,
            input_size=64,
            tolerance={"max_abs_diff": 0.0, "min_cosine": 1.01},
        )
    assert not out.exists() and not out.with_suffix(".json").exists()
    assert not list(tmp_path.glob("*.onnx"))


def test_rgb_model_needs_a_channel_count(tmp_path):
    with pytest.raises(ConfigError, match="--channels NAMES or --n-channels"):
        export_onnx("random:vit_test16", tmp_path / "x.onnx")


def test_int8_quality_bounds(tmp_path):
    src = tmp_path / "m.onnx"
    export_onnx("random:vit_tiny16", src, n_channels=3, crop_size=48, input_size=64)
    q = quantize(src, tmp_path / "m.int8.onnx")["quantization"]
    fast = dynamic_forms()[0][0]  # the first form this CPU may run
    assert q["method"] == "dynamic" and q["forms_tried"][fast] >= FAST_FORM_MIN_COSINE
    assert q["weights"] == fast and list(q["forms_tried"]) == [fast]  # the fast form kept accuracy: no other tried
    assert q["min_cosine_to_fp32"] >= 0.995 and q["median_cosine_to_fp32"] >= 0.999
    acc = q["knn_leave_one_out_top1"]
    assert abs(acc["int8"] - acc["fp32"]) <= 0.1
    assert read_sidecar(tmp_path / "m.int8.onnx")["precision"] == "int8"


@pytest.mark.slow
def test_int8_takes_the_most_accurate_form_when_none_keeps_the_bar(tmp_path, monkeypatch):
    from scdino.export import quantize as qmod

    src = tmp_path / "m.onnx"
    export_onnx("random:vit_tiny16", src, n_channels=3, crop_size=48, input_size=64)
    monkeypatch.setattr(qmod, "FAST_FORM_MIN_COSINE", 1.01)  # no form can keep it: every form is tried
    monkeypatch.setattr(qmod, "has_vnni", lambda: True)
    q = quantize(src, tmp_path / "m.int8.onnx")["quantization"]
    tried = q["forms_tried"]
    assert list(tried) == [name for name, _, _ in DYNAMIC_FORMS]
    assert q["needs_vnni"] == dict((f[0], f[2]) for f in DYNAMIC_FORMS)[q["weights"]]
    assert q["weights"] == max(tried, key=tried.get) and q["min_cosine_to_fp32"] == tried[q["weights"]]
    # the file written is the chosen form: its own embeddings give the reported cosine

    import onnxruntime as ort

    crops = fit_crops(packaged_crops(), 3, 48, "uint16")

    def embed(path):  # in batches of 16, as the check runs (dynamic int8 scales activations per batch)
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return np.concatenate([sess.run(["cls"], {"crops": crops[i : i + 16]})[0] for i in range(0, len(crops), 16)])

    ref, got = embed(src).astype(np.float64), embed(tmp_path / "m.int8.onnx").astype(np.float64)
    cos = (got * ref).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(ref, axis=1)
    assert float(cos.min()) == pytest.approx(tried[q["weights"]], abs=1e-5)


@pytest.mark.slow
def test_int8_forms_follow_the_cpu_and_a_vnni_form_warns_elsewhere(tmp_path, monkeypatch, caplog):
    from scdino.export import quantize as qmod

    # full 8-bit signed weights only where int8 products are summed in 32 bits
    assert [f[0] for f in dynamic_forms(vnni=False)] == ["int8 per channel, 7 bit", "uint8"]
    assert dynamic_forms(vnni=True)[0][0] == "int8 per channel, 8 bit"
    src = tmp_path / "m.onnx"
    export_onnx("random:vit_tiny16", src, n_channels=3, crop_size=48, input_size=64)
    monkeypatch.setattr(qmod, "has_vnni", lambda: True)
    # the CPU running the test may lack VNNI: there 8-bit weights saturate (min cosine 0.9963 measured on such a CPU,
    # under the 0.999 bar) and the next form would be taken; the bar is lowered so that the test checks which form the
    # VNNI rule tries first and keeps, on any CPU
    monkeypatch.setattr(qmod, "FAST_FORM_MIN_COSINE", 0.99)
    q = quantize(src, tmp_path / "v.onnx")["quantization"]
    assert q["weights"] == "int8 per channel, 8 bit" and q["needs_vnni"]
    assert list(q["forms_tried"]) == ["int8 per channel, 8 bit"]  # kept: no other form tried
    monkeypatch.setattr(scdino.cpu, "has_vnni", lambda: False)
    assert ortb.warn_int8_form(tmp_path / "v.onnx")
    assert "made on a CPU with VNNI" in caplog.text and "scdino-export quantize" in caplog.text
    monkeypatch.setattr(scdino.cpu, "has_vnni", lambda: True)
    assert not ortb.warn_int8_form(tmp_path / "v.onnx")


def test_vnni_is_read_from_the_cpu_flags(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f\n")
    assert not scdino.cpu.has_vnni.__wrapped__(str(info))
    info.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512_vnni\n")
    assert scdino.cpu.has_vnni.__wrapped__(str(info))
    assert not scdino.cpu.has_vnni.__wrapped__(str(tmp_path / "missing"))  # unreadable: the safe answer


def card_of(spec: str) -> ModelCard:
    """A card with only what :func:`backends.resolve` reads: the spec and its format (from the file name)."""
    return ModelCard(spec, model_format(spec), "vit_test16", 32, 32, Preprocessing(32), False, None, None, None)


def test_backend_choice(monkeypatch):
    monkeypatch.setattr(backends, "cuda_available", lambda: False)
    assert backends.resolve("auto", "auto", card_of("random:vit_small16")) == ("torch", "cpu")
    assert backends.resolve("auto", "auto", card_of("x/model.onnx")) == ("onnxruntime", "cpu")
    with pytest.raises(ConfigError, match="runs on an NVIDIA GPU only"):
        backends.resolve("auto", "auto", card_of("model.plan"))
    with pytest.raises(ConfigError, match="export it first: scdino-export onnx ck.pth"):
        backends.resolve("onnxruntime", "auto", card_of("ck.pth"))
    with pytest.raises(ConfigError, match="PyTorch sees no CUDA GPU"):
        backends.resolve("auto", "cuda", card_of("ck.pth"))
    monkeypatch.setattr(backends, "cuda_available", lambda: True)
    monkeypatch.setattr(backends, "_ort_has_cuda", lambda: True)
    assert backends.resolve("auto", "auto", card_of("model.plan")) == ("tensorrt", "cuda")
    assert backends.resolve("auto", "auto", card_of("model.onnx")) == ("onnxruntime", "cuda")
    assert backends.resolve("auto", "auto", card_of("ck.pth")) == ("torch", "cuda")
    monkeypatch.setattr(backends, "_ort_has_cuda", lambda: False)  # CPU onnxruntime on a GPU machine
    assert backends.resolve("auto", "auto", card_of("model.onnx")) == ("onnxruntime", "cpu")


def test_wrong_onnxruntime_installs_fail_loudly(monkeypatch):
    real = md.version
    monkeypatch.setattr(md, "version", lambda n: "1.0" if n == "onnxruntime-gpu" else real(n))
    with pytest.raises(ConfigError, match="onnxruntime and onnxruntime-gpu are both installed.*pip uninstall"):
        ortb.import_ort()
    monkeypatch.setattr(md, "version", real)
    with pytest.raises(ConfigError, match=r"needs onnxruntime-gpu.*(scdino\[gpu\]|'\.\[gpu\]')"):
        ortb.providers_for("cuda")  # the CPU build offers no CUDA provider


def test_plan_from_another_gpu_is_refused():
    meta = {
        "source_onnx": "m.onnx",
        "tensorrt": {"version": "10.3.0", "gpu": "NVIDIA RTX 4090", "compute_capability": "8.9"},
    }
    check_plan(meta, "10.3.0", {"gpu": "NVIDIA RTX 4090", "compute_capability": "8.9"})
    with pytest.raises(
        CheckpointError,
        match="built for GPU NVIDIA RTX 4090 sm 8.9 .*Rebuild it on this machine: "
        "scdino-export tensorrt m.onnx --out x.plan",
    ):
        check_plan(meta, "10.3.0", {"gpu": "NVIDIA A100", "compute_capability": "8.0"}, "x.plan")
    with pytest.raises(CheckpointError, match="TensorRT 10.3.0 \\(this machine: 10.8.0\\)"):
        check_plan(meta, "10.8.0", {"gpu": "NVIDIA RTX 4090", "compute_capability": "8.9"})


def test_engine_with_onnx_equals_checkpoint(tmp_path, scratch_plate):
    ckpt = tmp_path / "dino.pth"
    dino_full_checkpoint(ckpt, arch="vit_test16", in_chans=3)
    onnx_path = tmp_path / "m.onnx"
    export_onnx(str(ckpt), onnx_path, channels=("H3342", "oblique"), crop_size=32, input_size=64)
    common = dict(plate=scratch_plate, input_size=64, progress=False, cells=CellOptions(labels="nuclei", crop_size=32))
    a = run(RunConfig(out=str(tmp_path / "a.zarr"), model=str(ckpt), export_cache=False, **common))
    b = run(RunConfig(out=str(tmp_path / "b.zarr"), model=str(onnx_path), **common))
    assert b.backend == "onnxruntime on cpu" and a.backend == "torch on cpu"
    x, y = ad.read_zarr(tmp_path / "a.zarr"), ad.read_zarr(tmp_path / "b.zarr")
    assert list(x.obs_names) == list(y.obs_names)
    ex, ey = x.obsm["X_scdino"].astype(np.float64), y.obsm["X_scdino"].astype(np.float64)
    cos = (ex * ey).sum(1) / np.linalg.norm(ex, axis=1) / np.linalg.norm(ey, axis=1)
    assert cos.min() >= 0.999
    assert y.uns["scdino"]["model"]["checkpoint_sha256"] == x.uns["scdino"]["checkpoint_sha256"]


def test_plan_and_onnx_sidecars_do_not_collide():
    from scdino.models.sidecar import sidecar_path

    assert sidecar_path("x/model.onnx").name == "model.json"
    assert sidecar_path("x/model.int8.onnx").name == "model.int8.json"
    assert sidecar_path("x/model.plan").name == "model.plan.json"


def test_int8_below_the_cosine_floor_is_not_written(tmp_path):
    src = tmp_path / "m.onnx"
    export_onnx("random:vit_test16", src, n_channels=2, crop_size=32, input_size=64)
    with pytest.raises(VerificationError, match="int8 \\(dynamic\\) embeddings reach only cosine.*not written"):
        quantize(src, tmp_path / "q.onnx", min_cosine=1.01)
    assert not (tmp_path / "q.onnx").exists() and not (tmp_path / "q.json").exists()


def test_quantize_says_what_its_check_measured(tmp_path):
    from click.testing import CliRunner

    from scdino.export.cli import main

    export_onnx("random:vit_test16", tmp_path / "m.onnx", n_channels=3, crop_size=32, input_size=32)
    r = CliRunner().invoke(main, ["quantize", str(tmp_path / "m.onnx"), "--out", str(tmp_path / "q.onnx")])
    assert r.exit_code == 0, r.output
    assert "cosine to fp32 on 48 check crops" in r.stdout
    weights = read_sidecar(tmp_path / "q.onnx")["quantization"]["weights"]
    assert f"(int8 dynamic, {weights} weights)" in r.stdout
    assert "leave-one-out k-NN top-1 on those crops, each labelled by its brightest channel" in r.stdout


def test_sidecar_names_the_graph_io_and_the_crop_rule(tmp_path, tiny_plate):
    from scdino.cells.plate import FieldRef, Plate
    from scdino.cells.table import field_cells, read_crops

    out = tmp_path / "m.onnx"
    export_onnx("random:vit_test16", out, n_channels=2, crop_size=40, input_size=64, attention=True)
    side = read_sidecar(out)
    g = onnx.load(out).graph
    assert [i["name"] for i in side["graph"]["inputs"]] == [i.name for i in g.input] == ["crops"]
    assert [o["name"] for o in side["graph"]["outputs"]] == [o.name for o in g.output] == ["cls", "attention"]
    assert side["graph"]["inputs"][0]["dtype"] == "uint16" and g.input[0].type.tensor_type.elem_type == 4
    crops = fit_crops(packaged_crops()[:3], 2, 40, "uint16")
    for spec, got in zip(side["graph"]["outputs"], _ort(out).run(None, {"crops": crops})):
        assert [3 if d == "batch" else d for d in spec["shape"]] == list(got.shape) and got.dtype == spec["dtype"]
    assert set(side["crop_rule"]) == {"window", "centre", "border", "values", "size"}
    # the rule as written, applied by hand, cuts the engine's crops (a cell at the field's edge included)
    plate, ref, s = Plate(tiny_plate), FieldRef("A/1", "0"), 48
    table = field_cells(plate, ref, CellOptions(labels="nuclei", crop_size=s))
    field = plate.read(ref, [0, 1], slice(None), slice(None))
    padded = np.pad(field, ((0, 0), (s, s), (s, s)))  # zeros outside the field
    engine = read_crops(plate, table, [0, 1], s)
    for i, row in table.iterrows():
        y0, x0 = int(np.round(row["centroid_y"])) - s // 2, int(np.round(row["centroid_x"])) - s // 2
        np.testing.assert_array_equal(engine[i], padded[:, s + y0 : s + y0 + s, s + x0 : s + x0 + s])
    assert table["border"].any()


def test_int8_check_on_crops_a_fixed_range_clips_is_warned(tmp_path):
    import json

    from click.testing import CliRunner

    from scdino.export.cli import main
    from scdino.export.quantize import saturated_fraction
    from scdino.models.sidecar import sidecar_path

    crops = np.array([[[[0, 5], [10, 300]], [[1, 2], [3, 4]]]], np.uint16)  # 1 crop, 2 channels, 2 x 2
    # channel 0 in 0..8: 10 and 300 are out; channel 1 in 2..3: 1 and 4 are out -> 4 of 8 pixels
    assert saturated_fraction(crops, {"scale_lo": [0, 2], "scale_hi": [8, 3]}) == 0.5
    assert saturated_fraction(crops, {}) == 0.0  # per-crop scaling clips nothing
    m = tmp_path / "m.onnx"
    export_onnx("random:vit_test16", m, n_channels=3, crop_size=32, input_size=32)
    side = json.loads(sidecar_path(m).read_text())
    side["preprocessing"].update(scale_lo=[0, 0, 0], scale_hi=[255, 255, 255])  # an 8-bit range; the crops are 16-bit
    sidecar_path(m).write_text(json.dumps(side))
    r = CliRunner().invoke(main, ["quantize", str(m), "--out", str(tmp_path / "q.onnx")])
    assert r.exit_code == 0, r.output
    clipped = read_sidecar(tmp_path / "q.onnx")["quantization"]["check_pixels_clipped"]
    shipped = fit_crops(packaged_crops(), 3, 32, "uint16")
    assert clipped == pytest.approx(float((shipped > 255).mean()), abs=1e-4) and clipped > 0.5
    assert "clips" in r.output and "compares mostly flat images" in r.output  # the log's warning
    assert "Warning: the model's fixed intensity range clips" in r.stdout
