"""The GPU paths' logic, checked on the CPU: a stand-in TensorRT module for the backend's thread safety, fake TensorRT
layers for the build's precision choices, and the device/backends choices of training, ONNX Runtime and the cluster.
(What needs a real GPU is in test_gpu.py and benchmarks/gpu_check.py.)"""

import sys
import threading
import types

import fake_tensorrt
import numpy as np
import pytest
import torch
from fake_tensorrt import FakeContext, HostMemory, expected, write_plan

from conftest import stand_in_card
from scdino.engine import backends
from scdino.engine.backends.base import BackendSpec
from scdino.errors import ScdinoError
from scdino.models.card import ModelCard, PlanInfo, model_format
from scdino.preprocess import Preprocessing

# --------------------------------------------------------------------------------------------- a stand-in TensorRT


def plan_spec(tmp_path, batch=4, dim=6, **plan):
    """A stand-in plan (tests/fake_tensorrt.py) of 2 channels, 8 px crops, ``dim`` wide, tuned for ``batch``, and the
    backend spec of its card."""
    write_plan(tmp_path / "m.plan", width=dim, batches=(1, batch, 256), **plan)
    card = stand_in_card(
        spec=str(tmp_path / "m.plan"),
        format="plan",
        embed_dim=dim,
        precision="fp16",
        plan=PlanInfo("10.9.0", "fake", "9.0", 256, "int32"),
    )
    return BackendSpec(card=card, n_channels=2, kind="tensorrt", device="cuda", batch_size=batch)


def test_tensorrt_backend_serves_one_thread_at_a_time(tmp_path, monkeypatch):
    from scdino.engine.backends.tensorrt_backend import TensorRTBackend

    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt.make())
    backend = TensorRTBackend(plan_spec(tmp_path), memory=HostMemory())
    rng = np.random.default_rng(0)
    blocks = [rng.integers(0, 60000, size=(37, 2, 8, 8)).astype(np.uint16) for _ in range(2)]
    runs: list[tuple[int, np.ndarray]] = []
    errors: list[BaseException] = []

    def work(i):
        try:
            for _ in range(5):
                runs.append((i, backend.infer(blocks[i])))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(runs) == 10
    for i, emb in runs:  # each thread got its own rows, every time
        np.testing.assert_allclose(emb, expected(blocks[i], 6), rtol=1e-6)


def test_tensorrt_rows_not_written_are_an_error_not_garbage(tmp_path, monkeypatch):
    from scdino.engine.backends.tensorrt_backend import TensorRTBackend

    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt.make())
    backend = TensorRTBackend(plan_spec(tmp_path), memory=HostMemory())
    crops = np.ones((9, 2, 8, 8), np.uint16)
    np.testing.assert_allclose(backend.infer(crops), expected(crops, 6))
    monkeypatch.setattr(FakeContext, "skip_rows", 1)
    backend2 = TensorRTBackend(plan_spec(tmp_path), memory=HostMemory())  # fresh buffers: no stale rows
    with pytest.raises(ScdinoError, match="left 3 of 9 embeddings unwritten"):
        backend2.infer(crops)


def test_a_failed_batch_leaves_no_batch_in_flight(tmp_path, monkeypatch):
    from scdino.engine.backends.tensorrt_backend import TensorRTBackend

    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt.make())
    backend = TensorRTBackend(plan_spec(tmp_path), memory=HostMemory())
    monkeypatch.setattr(FakeContext, "calls", 0)
    monkeypatch.setattr(FakeContext, "fail_on_call", 2)  # the second batch fails while the first is in flight
    crops = np.ones((12, 2, 8, 8), np.uint16)
    with pytest.raises(ScdinoError, match="TensorRT execution failed"):
        backend.infer(crops)
    assert all(slot["pending"] is None for slot in backend.slots)  # drained: the next call starts clean
    np.testing.assert_allclose(backend.infer(crops), expected(crops, 6))
    backend.close()


def test_a_busy_backend_is_never_closed_to_make_room(monkeypatch):
    closed = []

    class Fake:
        def __init__(self, spec):
            self.spec = spec

        def close(self):
            closed.append(self.spec.seed)

    monkeypatch.setattr(backends, "open_backend", Fake)
    monkeypatch.setattr(backends, "_CACHE", {})
    monkeypatch.setattr(backends, "_USERS", {})
    monkeypatch.setattr(backends, "CACHE_SIZE", 1)
    specs = [BackendSpec(card=None, n_channels=1, seed=i) for i in range(3)]
    with backends.using(specs[0]) as a:
        with backends.using(specs[1]):
            pass  # 1 is idle now, 0 is busy: 1 goes, 0 stays
        assert closed == [1] and a.spec.seed == 0 and specs[0] in backends._CACHE
    with backends.using(specs[2]):
        pass
    assert closed == [1, 0]  # 0 was closed only once nobody used it


# ------------------------------------------------------------------------------------ TensorRT build choices


def fake_trt_build(version):
    trt = types.SimpleNamespace(__version__=version)
    trt.BuilderFlag = types.SimpleNamespace(FP16=1, INT8=2, OBEY_PRECISION_CONSTRAINTS=3)
    trt.NetworkDefinitionCreationFlag = types.SimpleNamespace(STRONGLY_TYPED=5)
    if version.startswith("11"):
        del trt.BuilderFlag.FP16
    return trt


def test_build_plans_obey_the_export_and_allow_fp16_around_int8():
    from scdino.errors import ConfigError
    from scdino.export.tensorrt_build import build_plan

    t10, t11 = fake_trt_build("10.9.0"), fake_trt_build("11.0.0")
    # an fp16 export is built strongly typed: its own casts are obeyed, not taken as hints
    assert build_plan(t10, "fp16", fp16=True, int8=False).strongly_typed
    assert build_plan(t10, "fp16", fp16=True, int8=False).flags == ()
    # fp16 from an fp32 export (TensorRT 10): the FP16 flag with the sensitive layers pinned
    p = build_plan(t10, "fp32", fp16=True, int8=False)
    assert not p.strongly_typed and "FP16" in p.flags and p.pin_fp32
    # int8 allows fp16 for the layers without Q/DQ, instead of leaving them in fp32
    p = build_plan(t10, "fp32", fp16=False, int8=True)
    assert {"INT8", "FP16"} <= set(p.flags) and p.pin_fp32
    with pytest.raises(ConfigError, match="takes precisions from the ONNX file"):
        build_plan(t11, "fp32", fp16=True, int8=False)
    assert build_plan(t11, "fp32", fp16=False, int8=True).strongly_typed


class FakeTensor:
    def __init__(self, dtype):
        self.dtype = dtype


class FakeLayer:
    def __init__(self, name, type_, outs):
        self.name, self.type, self.outs = name, type_, [FakeTensor(d) for d in outs]
        self.precision, self.pinned_outputs = None, []

    @property
    def num_outputs(self):
        return len(self.outs)

    def get_output(self, j):
        return self.outs[j]

    def set_output_type(self, j, dtype):
        self.pinned_outputs.append((j, dtype))


def test_pinning_follows_output_types_before_the_patch_embedding_and_only_norms_after():
    from scdino.export.tensorrt_build import pin_sensitive_layers

    T = types.SimpleNamespace
    trt = T(float32="f32", float16="f16", int64="i64", bool="b")
    trt.LayerType = T(
        CONVOLUTION="conv",
        SELECT="select",
        ELEMENTWISE="ew",
        SHAPE="shape",
        SOFTMAX="softmax",
        NORMALIZATION="norm",
        MATRIX_MULTIPLY="mm",
        REDUCE="reduce",
        RESIZE="resize",
        IDENTITY="cast",
    )
    layers = [
        FakeLayer("cast crops", "cast", ["f32"]),
        FakeLayer("min-max span > 0", "ew", ["b"]),  # a bool output: not a float layer
        FakeLayer("Where(span > 0, 1/span, 0)", "select", ["f32"]),  # bool first input, float output: pinned
        FakeLayer("shape of crops", "shape", ["i64"]),  # shape layers keep their types
        FakeLayer("resize", "resize", ["f32"]),
        FakeLayer("patch embedding", "conv", ["f32"]),
        FakeLayer("layernorm", "norm", ["f32"]),
        FakeLayer("qkv", "mm", ["f32"]),
        FakeLayer("attention softmax", "softmax", ["f32"]),  # left to TensorRT: fused attention
        FakeLayer("a shape after", "shape", ["i64"]),
    ]
    net = T(num_layers=len(layers), get_layer=lambda i: layers[i])
    assert pin_sensitive_layers(trt, net) == 4
    pinned = [la.name for la in layers if la.precision == "f32"]
    assert pinned == ["cast crops", "Where(span > 0, 1/span, 0)", "resize", "layernorm"]
    assert all(la.pinned_outputs == [(0, "f32")] for la in layers if la.precision == "f32")


# ------------------------------------------------------------------------------------------ device choices


def test_torchrun_on_a_gpu_machine_with_device_cpu_uses_gloo(monkeypatch):
    from scdino.training import loop
    from scdino.training.config import TrainConfig

    calls = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda i: calls.append(("set_device", i)))
    monkeypatch.setattr(loop.dist, "is_initialized", lambda: False)

    def init(backend, **kw):
        calls.append(("init", backend, kw))
        raise RuntimeError("stop here")

    monkeypatch.setattr(loop.dist, "init_process_group", init)
    with pytest.raises(RuntimeError, match="stop here"):
        loop.setup_distributed(TrainConfig(data="d", out="o", device="cpu"))
    assert calls == [("init", "gloo", {})]
    calls.clear()
    with pytest.raises(RuntimeError, match="stop here"):
        loop.setup_distributed(TrainConfig(data="d", out="o", device="cuda"))
    # the device is set before the process group starts, and handed to it
    assert calls == [("set_device", 1), ("init", "nccl", {"device_id": torch.device("cuda", 1)})]


def fake_ort():
    ort = types.SimpleNamespace(__version__="1.23.0")
    ort.get_available_providers = lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ort


def card_of(spec: str) -> ModelCard:
    """A card with only what :func:`backends.resolve` reads: the spec and its format (from the file name)."""
    return ModelCard(spec, model_format(spec), "vit_test16", 32, 32, Preprocessing(32), False, None, None, None)


def test_onnxruntime_auto_falls_back_to_the_cpu_when_cuda_cannot_load(monkeypatch, caplog):
    import json
    import subprocess

    from scdino.engine.backends import onnxruntime_backend as ortb

    probes = []

    def probe(got):
        def run(cmd, **kw):
            probes.append(cmd)
            assert "preload_dlls" in cmd[-1] and "CUDAExecutionProvider" in cmd[-1]  # a real session, in a child
            return subprocess.CompletedProcess(cmd, 0, json.dumps(got) + "\n", "")

        return run

    monkeypatch.setattr(ortb, "import_ort", fake_ort)  # CUDA listed ...
    monkeypatch.setattr(backends, "cuda_available", lambda: True)
    monkeypatch.setattr(ortb, "_CUDA_WORKS", None)
    monkeypatch.setattr(subprocess, "run", probe(["CPUExecutionProvider"]))  # ... but a session falls back
    assert backends.resolve("auto", "auto", card_of("m.onnx")) == ("onnxruntime", "cpu")
    assert probes and "falls back to the CPU" in caplog.text
    # an explicit --device cuda is not quietly changed (the backend then fails loudly if CUDA does not load)
    assert backends.resolve("auto", "cuda", card_of("m.onnx")) == ("onnxruntime", "cuda")
    monkeypatch.setattr(ortb, "_CUDA_WORKS", None)
    monkeypatch.setattr(subprocess, "run", probe(["CUDAExecutionProvider", "CPUExecutionProvider"]))
    assert backends.resolve("auto", "auto", card_of("m.onnx")) == ("onnxruntime", "cuda")
    monkeypatch.setattr(
        ortb,
        "import_ort",
        lambda: types.SimpleNamespace(
            get_available_providers=lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"]
        ),
    )
    assert ortb.providers_for("cuda")[0] == ("CUDAExecutionProvider", {"device_id": 0})


def test_one_worker_per_gpu_each_pinned_to_its_own(monkeypatch):
    from scdino.engine.cluster import gpu_for, visible_gpus
    from scdino.engine.config import RunConfig
    from scdino.engine.pipeline import local_workers

    assert [gpu_for(i, ["2", "3"]) for i in range(4)] == ["2", "3", "2", "3"]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "5,7")
    assert visible_gpus() == ["5", "7"]
    assert local_workers(RunConfig(plate="p", out="o"), "cuda") == 2
    assert local_workers(RunConfig(plate="p", out="o"), "cpu") == 1
    assert local_workers(RunConfig(plate="p", out="o", workers=3), "cuda") == 3


def test_fused_gradient_clipping_equals_the_per_parameter_rule():
    from scdino.training.dino import clip_fused

    torch.manual_seed(0)
    grads = [torch.randn(50) * s for s in (0.1, 10.0, 3.0)]
    want = []
    for g in grads:
        f = 3.0 / (g.norm(2) + 1e-6)
        want.append(g * f if f < 1 else g.clone())
    got = [g.clone() for g in grads]
    clip_fused(got, 3.0)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


@pytest.mark.slow
def test_the_device_check_runs_its_cpu_sections_here(tmp_path):
    """benchmarks/gpu_check.py on a machine without CUDA, run as a script (tests never import benchmarks): CPU
    sections run, CUDA ones say why they are skipped."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"
    only = "training_cpu,onnxruntime_cpu,torch_backend"
    p = subprocess.run(
        [sys.executable, str(script), "--quick", "--only", only, "--out", str(tmp_path / "g.json")],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    by = {r["check"]: r for r in map(json.loads, p.stdout.splitlines())}
    assert set(by) == {"machine", *only.split(",")}
    assert by["training_cpu"]["status"] == "ok" and by["training_cpu"]["reload_equal"]
    assert by["onnxruntime_cpu"]["status"] == "ok" and by["onnxruntime_cpu"]["finite"]
    if not torch.cuda.is_available():
        assert by["torch_backend"] == {
            **by["torch_backend"],
            "status": "skipped",
            "why": "no CUDA device visible to PyTorch",
        }
    # the JSON file holds the same checks as the lines printed, in the script's order
    assert [r["check"] for r in json.loads((tmp_path / "g.json").read_text())["results"]] == list(by)[1:]
