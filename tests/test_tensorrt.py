"""TensorRT 10 and 11 read the same way, checked on the CPU against the stand-in module (tests/fake_tensorrt.py) and
the inspector JSON in the shapes each version documents (tests/data/tensorrt1*_inspector.json): the plan's precision,
its tensors and profile, the profile's default opt batch, the build's sidecar and the backend's checks."""

import hashlib
import json
import shutil
import sys

import fake_tensorrt
import numpy as np
import pytest
from fake_tensorrt import FakeContext, HostMemory, expected, write_plan

from conftest import stand_in_card
from scdino.batches import plan_batches
from scdino.engine.backends.base import BackendSpec
from scdino.errors import CheckpointError, ConfigError
from scdino.export.tensorrt_plan import plan_io, precision_of, read_precision
from scdino.models.card import ModelCard, PlanInfo
from scdino.models.sidecar import sidecar_path
from scdino.preprocess import Preprocessing

ENGINE_IO = {"crops": "int", "cls": "fp32"}  # get_tensor_dtype of the samples' plan: INT32 in, FLOAT out


def sample(major: int) -> dict:
    return json.loads(fake_tensorrt.inspector_sample(major))


# ------------------------------------------------------------------------------------------ the plan's precision


def test_tensorrt_10_and_11_inspector_json_give_the_same_precision():
    """The same fp16 plan as TensorRT 10 (combined Format/Datatype) and 11 (separate Datatype/Format) report it."""
    r10, r11 = read_precision(sample(10), ENGINE_IO), read_precision(sample(11), ENGINE_IO)
    assert r10.precision == r11.precision == "fp16"
    assert set(r10.keys_read) == {"Format/Datatype"} and r10.schema == "TensorRT 10 (Format/Datatype)"
    assert set(r11.keys_read) == {"Datatype"} and r11.schema == "TensorRT 11 (Datatype, Format)"
    # what voted: 10's patch embedding and its fused region (read as fp16 from its input, though it writes fp32);
    # 11's patch embedding and three matrix multiplies; not the fp32 preprocessing, casts and LayerNorm kernels
    assert r10.computing == {"fp16": 2} and r11.computing == {"fp16": 4}
    assert r10.io_agree and r11.io_agree
    assert r11.io == {"crops": {"engine": "int", "inspector": "int"}, "cls": {"engine": "fp32", "inspector": "fp32"}}


def test_fp32_layers_around_the_matmuls_do_not_outvote_them():
    """Counting every layer by its outputs (the rule before) calls TensorRT 10's fp16 sample fp32: four layers write
    fp32 (three of the pinned preprocessing and the fused region's CLS output), two fp16."""
    by_outputs = {}
    for layer in sample(10)["Layers"]:
        p = precision_of(" ".join(o["Format/Datatype"] for o in layer["Outputs"]))
        by_outputs[p] = by_outputs.get(p, 0) + 1
    assert by_outputs == {"fp32": 4, "fp16": 2}
    assert read_precision(sample(10), ENGINE_IO).precision == "fp16"


def test_a_computing_layer_computes_in_the_lowest_type_it_reads():
    """A Q/DQ convolution of TensorRT 10 reads int8 and writes fp16: int8. A fused region that shows only fp32 does not
    vote (its inner types are hidden); its kernel's name counts where it has one."""
    conv = {
        "Name": "/patch_embed/proj/Conv",
        "LayerType": "CaskConvolution",
        "Inputs": [{"Name": "q", "Format/Datatype": "Thirty-two wide channel vectorized row major Int8 format"}],
        "Outputs": [{"Name": "y", "Format/Datatype": "Channel major FP16 format where channel % 8 == 0 (kHWC8)"}],
    }
    fused = {
        "Name": "{ForeignNode[/blocks.0/...]}",
        "LayerType": "Myelin",
        "Inputs": [{"Name": "crops", "Format/Datatype": "Int32"}],
        "Outputs": [{"Name": "cls", "Format/Datatype": "Float"}],
    }
    gemm = {
        "Name": "qkv",
        "LayerType": "gemm",
        "Inputs": [{"Name": "a", "Format/Datatype": "Float"}],
        "Outputs": [{"Name": "b", "Format/Datatype": "Float"}],
        "TacticName": "sm80_xmma_gemm_f16f16_f16f32_f32_nn_n_tilesize64x64x64_stage4",
    }
    r = read_precision({"Layers": [conv, fused]}, {})
    assert r.computing == {"int8": 1, "unknown": 1} and r.precision == "int8"
    assert read_precision({"Layers": [fused]}, {}).precision is None  # nothing told: the build records what it asked
    assert read_precision({"Layers": [gemm, fused]}, {}).computing == {"fp16": 1, "unknown": 1}
    # TF32 kernels are fp32 compute
    tf32 = {**gemm, "TacticName": "sm80_xmma_gemm_f32f32_tf32f32_f32_nn_n_tilesize32x32x64_stage3"}
    assert read_precision({"Layers": [tf32]}, {}).precision == "fp32"


def test_uint8_is_not_int8_and_dynamic_shapes_say_nothing():
    assert precision_of("Row major linear UInt8 format") == "int"
    assert precision_of("Thirty-two wide channel vectorized row major Int8 format.") == "int8"
    assert precision_of("N/A due to dynamic shapes") is None
    assert precision_of("Half") == "fp16" and precision_of("Row major linear FP32 format (kLINEAR)") == "fp32"


def test_an_inspector_that_disagrees_with_the_engine_is_not_trusted():
    """The engine's own output type (get_tensor_dtype: HALF) against what the inspector wrote for it (Float): the
    inspector's tensors were misread, so its layers do not set the precision."""
    r = read_precision(sample(11), {"crops": "int", "cls": "fp16"})
    assert r.io_agree is False and r.precision is None
    assert r.io["cls"] == {"engine": "fp16", "inspector": "fp32"}


# ------------------------------------------------------------------------------------------ the plan's tensors


def test_the_plans_tensors_and_profile_come_from_the_plan(tmp_path):
    trt = fake_tensorrt.make("11.1.0")
    path = write_plan(
        tmp_path / "p.plan",
        channels=3,
        crop=24,
        width=384,
        batches=(1, 128, 256),
        names=("x", "y"),
        dtypes=("UINT8", "HALF"),
    )
    engine = trt.Runtime(trt.Logger()).deserialize_cuda_engine(path.read_bytes())
    io = plan_io(trt, engine, str(path))
    assert (io.input, io.output, io.input_dtype, io.output_dtype) == ("x", "y", "uint8", "float16")
    assert (io.channels, io.crop_size, io.width, io.batches) == (3, 24, 384, (1, 128, 256))


# ------------------------------------------------------------------------------------------ the profile's batches


def card_of(arch: str, input_size: int) -> ModelCard:
    return ModelCard("m.onnx", "onnx", arch, 384, input_size, Preprocessing(input_size), True, 2, None, None)


def test_the_default_opt_batch_is_the_batch_the_engine_sends_on_a_gpu(monkeypatch):
    """Worked out by hand from the GPU token budget (256 crops x 197 tokens): ViT-S/16 at 224 px has 197 tokens ->
    256 crops; at 320 px 401 tokens -> 50432 / 401 = 125.8 -> 128; ViT-B/8 at 224 px 785 tokens -> 64.2 -> 64."""
    from scdino.engine import backends, pipeline
    from scdino.engine.config import RunConfig

    hand = {("vit_small16", 224): 256, ("vit_small16", 320): 128, ("vit_base8", 224): 64}
    monkeypatch.setattr(backends, "cuda_available", lambda: True)
    for (arch, size), batch in hand.items():
        card = card_of(arch, size)
        assert plan_batches(card.tokens) == (1, batch, 256)
        # and the engine, on a GPU, sends that many per pass
        spec = pipeline.backend_spec(RunConfig(plate="p", out="o", device="cuda", backend="onnxruntime"), card, 2)
        assert spec.batch_size == batch
    assert plan_batches(card_of("vit_small16", 224).tokens, max_batch=128) == (1, 128, 128)  # never above max
    assert plan_batches(401, opt=32) == (1, 32, 256)
    with pytest.raises(ConfigError, match="--opt-batch 512: expected a whole number from 1 to --max-batch"):
        plan_batches(197, opt=512)


# ------------------------------------------------------------------------------------------ build and run


@pytest.fixture(scope="module")
def vit8_onnx(tmp_path_factory):
    """ViT-test/8 at 160 px (401 tokens), 2 channels, 16 px uint16 crops."""
    from scdino.export.onnx_export import export_onnx

    path = tmp_path_factory.mktemp("trt") / "m.onnx"
    export_onnx("random:vit_test8", path, n_channels=2, crop_size=16, input_size=160)
    return path


@pytest.mark.parametrize("version", ["10.9.0", "11.1.0"])
def test_a_built_plan_records_its_profile_tensors_and_precision_and_runs(vit8_onnx, tmp_path, monkeypatch, version):
    from scdino.engine.backends.tensorrt_backend import TensorRTBackend
    from scdino.export import tensorrt_build
    from scdino.models import describe_model

    trt = fake_tensorrt.make(version)
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setattr(tensorrt_build, "gpu_identity", lambda: {"gpu": "fake", "compute_capability": "9.0"})
    plan = tmp_path / "m.plan"
    meta = tensorrt_build.build_engine(vit8_onnx, plan)
    # the profile: tuned for the batch the engine sends this model on a GPU (401 tokens: 128, worked out above)
    assert trt.BUILDS[0]["profile"] == ((1, 2, 16, 16), (128, 2, 16, 16), (256, 2, 16, 16))
    t = meta["tensorrt"]
    assert t["profile"] == {"min": 1, "opt": 128, "max": 256, "opt_from": "gpu_batch_size(401 tokens)"}
    assert (t["opt_batch"], t["max_batch"]) == (128, 256)
    # the tensors as the built plan declares them: the uint16 input widened to int32
    assert (t["io"]["input"], t["io"]["input_dtype"], t["io"]["output"], t["io"]["output_dtype"]) == (
        "crops",
        "int32",
        "cls",
        "float32",
    )
    assert meta["input_dtype"] == "int32"
    # the sidecar proves which plan it is, and which graph the plan was built from (hashed here, independently)
    assert meta["plan_sha256"] == hashlib.sha256(plan.read_bytes()).hexdigest()
    assert meta["source_graph_sha256"] == hashlib.sha256(vit8_onnx.read_bytes()).hexdigest()
    assert "graph_sha256" not in meta
    # the precision as the plan's layers report it (the sample is an fp16 plan; fp32 was asked), and where from
    assert meta["precision"] == "fp16" and t["asked"] == "fp32" and t["precision_from"] == "engine inspector"
    report = t["precision_report"]
    assert set(report["keys_read"]) == ({"Datatype"} if version.startswith("11") else {"Format/Datatype"})
    assert report["io_agree"] is True and report["rule"]
    # the engine runs it: batches of the plan's opt size, never above its max
    card = describe_model(str(plan), n_channels=2, crop_size=16)
    spec = BackendSpec(card=card, n_channels=2, kind="tensorrt", device="cuda", batch_size=64)
    backend = TensorRTBackend(spec, memory=HostMemory())
    assert backend.batch == 128 and backend.info["profile"] == {"min": 1, "opt": 128, "max": 256}
    monkeypatch.setattr(FakeContext, "shapes", [])
    crops = np.random.default_rng(0).integers(0, 60000, size=(300, 2, 16, 16)).astype(np.uint16)
    np.testing.assert_allclose(backend.infer(crops), expected(crops, 32), rtol=1e-6)
    assert [s[0] for s in FakeContext.shapes] == [128, 128, 44]
    backend.close()
    # a sidecar that names the input otherwise than the plan does: refused, naming both
    side = json.loads(sidecar_path(plan).read_text())
    side["graph"]["inputs"][0]["name"] = "images"
    sidecar_path(plan).write_text(json.dumps(side))
    card = describe_model(str(plan), n_channels=2, crop_size=16)
    with pytest.raises(CheckpointError, match="input name 'crops' \\(sidecar: 'images'\\)"):
        TensorRTBackend(BackendSpec(card=card, n_channels=2, kind="tensorrt", device="cuda"), memory=HostMemory())


def test_a_plan_file_swapped_under_a_sidecar_is_refused_and_so_is_a_swapped_graph(vit8_onnx, tmp_path, monkeypatch):
    from scdino.export import tensorrt_build
    from scdino.export.onnx_export import export_onnx
    from scdino.models import describe_model

    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt.make("10.9.0"))
    monkeypatch.setattr(tensorrt_build, "gpu_identity", lambda: {"gpu": "fake", "compute_capability": "9.0"})
    tensorrt_build.build_engine(vit8_onnx, tmp_path / "a.plan")
    (tmp_path / "b.plan").write_bytes((tmp_path / "a.plan").read_bytes() + b"other")  # another plan's bytes
    shutil.copyfile(sidecar_path(tmp_path / "a.plan"), sidecar_path(tmp_path / "b.plan"))
    with pytest.raises(CheckpointError, match="b.plan: not the model its sidecar b.plan.json describes"):
        describe_model(str(tmp_path / "b.plan"), n_channels=2, crop_size=16)
    # a build from a graph that is not its sidecar's: refused before anything is built
    other = tmp_path / "o.onnx"
    export_onnx(describe_model("random:vit_test8", n_channels=2, input_size=160, seed=5), other, crop_size=16)
    shutil.copyfile(other, tmp_path / "swapped.onnx")
    shutil.copyfile(sidecar_path(vit8_onnx), sidecar_path(tmp_path / "swapped.onnx"))
    with pytest.raises(CheckpointError, match="not the model its sidecar swapped.json describes"):
        tensorrt_build.build_engine(tmp_path / "swapped.onnx", tmp_path / "s.plan")
    assert not (tmp_path / "s.plan").exists()


def test_the_command_builds_for_the_engines_batch_and_says_how(vit8_onnx, tmp_path, monkeypatch):
    from click.testing import CliRunner

    from scdino.export import tensorrt_build
    from scdino.export.cli import main

    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt.make("11.1.0"))
    monkeypatch.setattr(tensorrt_build, "gpu_identity", lambda: {"gpu": "fake", "compute_capability": "9.0"})
    r = CliRunner().invoke(main, ["tensorrt", str(vit8_onnx), "--out", str(tmp_path / "m.plan")])
    assert r.exit_code == 0, r.output
    assert "fp16 as its layers report, batches 1..256 tuned for 128" in r.output


def test_an_inspector_that_says_nothing_leaves_the_precision_asked(vit8_onnx, tmp_path, monkeypatch):
    from scdino.export import tensorrt_build

    trt = fake_tensorrt.make("10.9.0", inspector='{"Layers": ["a layer name only"], "Bindings": ["crops", "cls"]}')
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setattr(tensorrt_build, "gpu_identity", lambda: {"gpu": "fake", "compute_capability": "9.0"})
    meta = tensorrt_build.build_engine(vit8_onnx, tmp_path / "m.plan", opt_batch=32, max_batch=64)
    assert meta["precision"] == "fp32" and meta["tensorrt"]["precision_from"] == "asked"
    assert meta["tensorrt"]["precision_report"]["schema"] == "no tensor types"
    assert trt.BUILDS[0]["profile"][1][0] == 32 and meta["tensorrt"]["profile"]["opt_from"] == "--opt-batch"


# ------------------------------------------------------------------------------------------ the backend's checks


def plan_card(tmp_path, **plan) -> BackendSpec:
    write_plan(tmp_path / "m.plan", **plan)
    card = stand_in_card(
        spec=str(tmp_path / "m.plan"),
        format="plan",
        embed_dim=6,
        precision="fp16",
        plan=PlanInfo("10.9.0", "fake", "9.0", 256, "int32"),
        details={"source_onnx": "m.onnx"},
    )
    return BackendSpec(card=card, n_channels=2, kind="tensorrt", device="cuda", batch_size=64)


@pytest.mark.parametrize(
    "plan, says",
    [
        ({"names": ("images", "cls")}, "input name 'images' \\(sidecar: 'crops'\\)"),
        ({"names": ("crops", "embedding")}, "output name 'embedding' \\(sidecar: 'cls'\\)"),
        ({"channels": 3}, "channels 3 \\(sidecar: 2\\)"),
        ({"crop": 16}, "crop size \\(px\\) 16 \\(sidecar: 8\\)"),
        ({"width": 12}, "output width 12 \\(sidecar: 6\\)"),
    ],
)
def test_a_plan_that_differs_from_its_sidecar_is_refused(tmp_path, monkeypatch, plan, says):
    from scdino.engine.backends.tensorrt_backend import TensorRTBackend

    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt.make())
    with pytest.raises(CheckpointError, match=f"disagree: {says}.*scdino-export tensorrt m.onnx --out"):
        TensorRTBackend(plan_card(tmp_path, **{"width": 6, **plan}), memory=HostMemory())


def test_the_backend_uses_the_plans_names_types_and_batch(tmp_path, monkeypatch):
    """Names other than crops/cls where the sidecar says so; buffers of the plan's types (a float32 input where its
    sidecar says int32; an fp16 output, returned as float32); batches of the plan's opt size (4), not the run's 64,
    which is above the plan's max (8)."""
    from scdino.engine.backends.tensorrt_backend import TensorRTBackend

    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt.make("11.1.0"))
    spec = plan_card(tmp_path, width=6, names=("x", "y"), dtypes=("FLOAT", "HALF"), batches=(1, 4, 8))
    plan = PlanInfo("11.1.0", "fake", "9.0", 8, "int32", input_name="x", output_name="y")
    spec = BackendSpec(card=ModelCard(**{**spec.card.__dict__, "plan": plan}), n_channels=2, kind="tensorrt",
                       device="cuda", batch_size=64)  # fmt: skip
    backend = TensorRTBackend(spec, memory=HostMemory())
    monkeypatch.setattr(FakeContext, "shapes", [])
    crops = np.arange(9 * 2 * 8 * 8, dtype=np.uint16).reshape(9, 2, 8, 8) % 50
    got = backend.infer(crops)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, expected(crops, 6))
    assert [s[0] for s in FakeContext.shapes] == [4, 4, 1]
