"""GPU paths: run with ``python -m pytest -m gpu`` on a machine with an NVIDIA GPU (deselected by default).

Needs a CUDA build of torch; the TensorRT tests also need ``pip install 'scdino[trt]'`` and the ONNX Runtime CUDA test
``scdino[gpu]`` (instead of the CPU onnxruntime).
"""

import anndata as ad
import numpy as np
import pytest
import torch

from scdino.cells.options import CellOptions
from scdino.engine.pipeline import RunConfig, run
from scdino.export.onnx_export import export_onnx

pytestmark = pytest.mark.gpu


def _cos(a, b):
    a, b = a.astype(np.float64), b.astype(np.float64)
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def _run(plate, out, model, **kw):
    run(
        RunConfig(
            plate=plate,
            out=str(out),
            model=model,
            input_size=112,
            progress=False,
            cells=CellOptions(labels="nuclei", crop_size=32),
            **kw,
        )
    )
    return ad.read_zarr(out).obsm["X_scdino"]


def test_torch_cuda_autocast_matches_cpu(scratch_plate, tmp_path):
    assert torch.cuda.is_available()
    cpu = _run(scratch_plate, tmp_path / "cpu.zarr", "random:vit_small16", device="cpu")
    gpu = _run(scratch_plate, tmp_path / "gpu.zarr", "random:vit_small16", device="cuda")
    assert _cos(cpu, gpu).min() >= 0.999


def test_onnxruntime_cuda_matches_cpu(scratch_plate, tmp_path):
    m = tmp_path / "m.onnx"
    export_onnx("random:vit_small16", m, channels=("H3342", "oblique"), crop_size=32, input_size=112)
    cpu = _run(scratch_plate, tmp_path / "cpu.zarr", str(m), device="cpu")
    gpu = _run(scratch_plate, tmp_path / "gpu.zarr", str(m), device="cuda")
    assert _cos(cpu, gpu).min() >= 0.999


def test_onnxruntime_cuda_io_binding_matches_the_cpu_path(tmp_path):
    """The CUDA path (raw crops bound on the device, one copy back per block) against the CPU path on the same crops,
    in blocks that are not whole batches."""
    from scdino.engine.backends.base import BackendSpec
    from scdino.engine.backends.onnxruntime_backend import OnnxRuntimeBackend
    from scdino.models import describe_model

    m = tmp_path / "m.onnx"
    export_onnx("random:vit_small16", m, channels=("H3342", "oblique"), crop_size=32, input_size=112)
    card = describe_model(str(m), n_channels=2)
    rng = np.random.default_rng(0)
    blocks = [rng.integers(0, 4000, size=(n, 2, 32, 32)).astype(np.uint16) for n in (37, 5)]
    cpu = OnnxRuntimeBackend(BackendSpec(card=card, n_channels=2, kind="onnxruntime", device="cpu", batch_size=16))
    gpu = OnnxRuntimeBackend(BackendSpec(card=card, n_channels=2, kind="onnxruntime", device="cuda", batch_size=16))
    assert gpu.info["io_binding"] and "CUDAExecutionProvider" in gpu.info["providers"]
    for crops in blocks:
        assert _cos(cpu.infer(crops), gpu.infer(crops)).min() >= 0.999


@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
def test_tensorrt_plan_matches_onnxruntime(scratch_plate, tmp_path, precision):
    import tensorrt as trt  # scdino[trt]; requested explicitly with -m gpu, so a missing install fails

    from scdino.export.tensorrt_build import build_engine

    src_precision = "fp16" if precision == "fp16" and int(trt.__version__.split(".")[0]) >= 11 else "fp32"
    m = tmp_path / "m.onnx"
    export_onnx(
        "random:vit_small16", m, channels=("H3342", "oblique"), crop_size=32, input_size=112, precision=src_precision
    )
    plan = tmp_path / "m.plan"
    meta = build_engine(m, plan, fp16=precision == "fp16", int8=precision == "int8", max_batch=128)
    assert meta["tensorrt"]["gpu"] == torch.cuda.get_device_name()
    ref = _run(scratch_plate, tmp_path / "ort.zarr", str(m), device="cpu")
    got = _run(scratch_plate, tmp_path / "trt.zarr", str(plan))
    assert _cos(ref, got).min() >= (0.999 if precision != "int8" else 0.99)


def device_check(*args: str) -> dict[str, dict]:
    """benchmarks/gpu_check.py run as a script (tests never import benchmarks): its JSON lines by check name."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"
    p = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, timeout=900)
    lines = [json.loads(ln) for ln in p.stdout.splitlines() if ln.startswith("{")]
    return {r["check"]: r for r in lines} | {"exit": {"code": p.returncode, "stderr": p.stderr[-2000:]}}


NEEDS_CUDA = ["device_preprocessing", "torch_backend", "knn", "training_fp16", "nccl"]


@pytest.mark.parametrize("name", NEEDS_CUDA + ["training_bf16", "onnxruntime_cuda", "cuml_umap"])
def test_device_check(name):
    """The device check's sections (benchmarks/gpu_check.py): those that need only CUDA must pass; the optional ones
    pass or say which package is missing."""
    r = device_check("--quick", "--only", name).get(name)
    assert r is not None and r["status"] == "ok" or (r["status"] == "skipped" and name not in NEEDS_CUDA), r
