"""One device check of scdino's GPU paths: one JSON line per check, in order, each ``ok``, ``failed`` or ``skipped``
(saying why: no CUDA, or a package that is not installed).

    python benchmarks/gpu_check.py [--out benchmarks/results/gpu_check.json] [--quick]

Needs only PyTorch and scdino's own source (no dask, zarr, anndata, scikit-image): the engine's backends, the model,
k-NN and the training step are imported directly. The optional sections (cuML, ONNX Runtime CUDA, TensorRT) run where
their packages are installed. On a machine without CUDA the CPU-side checks run and the rest say so; the ``gpu``
tests call the same functions.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Callable

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]


def import_project() -> None:
    """Make ``scdino`` importable from this checkout when it is not installed (a device machine that got the source
    tree only): the stage folders are mapped onto their subpackages as pyproject.toml's package-dir does."""
    try:
        import scdino.engine  # noqa: F401

        return
    except ImportError:
        pass
    import importlib.util

    sys.path.insert(0, str(ROOT / "src"))
    import scdino

    for name, folder in (
        ("scdino.engine", "engine"),
        ("scdino.engine.backends", "engine/backends"),
        ("scdino.export", "export"),
        ("scdino.training", "training"),
    ):
        path = ROOT / folder
        spec = importlib.util.spec_from_file_location(
            name, path / "__init__.py", submodule_search_locations=[str(path)]
        )
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
        parent, _, child = name.rpartition(".")
        setattr(sys.modules[parent] if parent != "scdino" else scdino, child, module)


import_project()


class Skip(Exception):
    """The check cannot run here (no CUDA, a package not installed); the message says which."""


def cuda() -> None:
    if not torch.cuda.is_available():
        raise Skip("no CUDA device visible to PyTorch")


def need(module: str) -> None:
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise Skip(f"{module} is not installed")


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-30)


def full_span_crops(n: int, c: int = 3, s: int = 64, seed: int = 0) -> np.ndarray:
    """uint16 crops over the whole range (0..65535): what overflows fp16 preprocessing if anything is not fp32."""
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 65536, size=(n, c, s, s), dtype=np.uint16)
    x[: max(1, n // 8), :, :8] = 65535
    return x


def spec_for(model: str, n_channels: int, device: str, batch: int, input_size: int):
    from scdino.engine.backends.base import BackendSpec
    from scdino.models.card import describe_model

    card = describe_model(model, n_channels=n_channels, input_size=input_size)
    return BackendSpec(card=card, n_channels=n_channels, kind="torch", device=device, batch_size=batch)


def torch_embed(model: str, crops: np.ndarray, device: str, batch: int = 64, input_size: int = 224) -> np.ndarray:
    from scdino.engine.backends.torch_backend import TorchBackend

    b = TorchBackend(spec_for(model, crops.shape[1], device, batch, input_size))
    try:
        return b.infer(crops)
    finally:
        b.close()


# ---------------------------------------------------------------------------------------------------------- checks


def check_device_preprocessing(quick: bool) -> dict:
    """uint16 crops -> pinned host memory -> device preprocessing equals the CPU's."""
    cuda()
    from scdino.preprocess import Preprocessing, apply

    crops = full_span_crops(64)
    prep = Preprocessing(224)
    cpu = apply(torch.from_numpy(crops.astype(np.int32)), prep)
    staged = torch.from_numpy(crops.astype(np.int32)).pin_memory()
    gpu = apply(staged.to("cuda", non_blocking=True), prep).cpu()
    diff = float((gpu - cpu).abs().max())
    return {"max_abs_diff": diff, "ok": diff < 1e-5}


def check_torch_backend(quick: bool) -> dict:
    """The torch backend on CUDA (fp16 autocast) against the CPU (fp32): cosine per cell."""
    cuda()
    crops = full_span_crops(16 if quick else 48)
    cpu = torch_embed("random:vit_small16", crops, "cpu")
    gpu = torch_embed("random:vit_small16", crops, "cuda")
    cmin = float(cosine(cpu, gpu).min())
    return {"cells": len(crops), "min_cosine": cmin, "ok": cmin >= 0.999}


def check_throughput(quick: bool) -> dict:
    """ViT-S/16 at 224: the torch backend's cells/s (raw uint16 crops in, preprocessing on the GPU) at several batch
    sizes, against a bare model-only fp16 and bf16 forward measured in the same run."""
    cuda()
    from scdino.engine.backends.torch_backend import TorchBackend
    from scdino.models import load_model

    n = 1024 if quick else 4096
    crops = full_span_crops(n)
    out: dict = {"model": "ViT-S/16", "input": 224, "cells": n, "gpu": torch.cuda.get_device_name()}
    for bs in (64, 128, 256):
        b = TorchBackend(spec_for("random:vit_small16", 3, "cuda", bs, 224))
        b.infer(crops[: 2 * bs])  # warm-up
        torch.cuda.synchronize()
        t = time.perf_counter()
        b.infer(crops)
        torch.cuda.synchronize()
        out[f"backend_cells_per_s_batch{bs}"] = round(n / (time.perf_counter() - t), 1)
        b.close()
    net = load_model("random:vit_small16", 3, 224).model.cuda().eval()
    x = torch.randn(256, 3, 224, 224, device="cuda")
    for name, dt in (("fp16", torch.float16), ("bf16", torch.bfloat16)):
        m = net.to(dt)
        with torch.inference_mode():
            m(x[:32].to(dt))
            torch.cuda.synchronize()
            t = time.perf_counter()
            reps = max(1, n // 256)
            for _ in range(reps):
                m(x.to(dt))
            torch.cuda.synchronize()
        out[f"model_only_{name}_cells_per_s"] = round(reps * 256 / (time.perf_counter() - t), 1)
    best = max(v for k, v in out.items() if k.startswith("backend_"))
    out["backend_share_of_fp16_ceiling"] = round(best / out["model_only_fp16_cells_per_s"], 3)
    out["ok"] = True
    return out


def check_knn(quick: bool) -> dict:
    """The k-NN vote on CUDA gives the CPU's predictions."""
    cuda()
    from scdino.knn import knn_predict

    rng = np.random.default_rng(0)
    ref, q = rng.normal(size=(2000, 384)).astype(np.float32), rng.normal(size=(500, 384)).astype(np.float32)
    lab = rng.integers(0, 7, 2000)
    a = knn_predict(ref, lab, q, device="cpu")
    b = knn_predict(ref, lab, q, device="cuda")
    agree = float((a == b).mean())
    return {"agreement": agree, "ok": agree >= 0.998}


def _train_steps(device: str, precision: str, tmp: Path) -> dict:
    from scdino.data import packaged_crops
    from scdino.training.config import build_config
    from scdino.training.loop import build, data_from_crops, resume, save_checkpoint, train_one_epoch

    sets = [
        "global_size=48",
        "local_size=24",
        "local_crops=2",
        "out_dim=1024",
        "head_hidden=256",
        "head_bottleneck=64",
        "warmup_epochs=0",
        f"precision={precision}",
        "max_iters_per_epoch=4",
    ]
    out = tmp / f"train_{device}_{precision}"
    cfg = build_config(
        None,
        sets,
        data="memory",
        out=str(out),
        arch="vit_tiny",
        patch=8,
        epochs=2,
        batch_size_per_device=8,
        device=device,
    )
    crops = torch.from_numpy(packaged_crops().astype(np.int32))
    tr = build(cfg, data_from_crops(cfg, crops, ["CTIP2", "BRN2", "ROR"]))
    losses = [train_one_epoch(tr, e, None)["loss"] for e in range(2)]
    save_checkpoint(tr, 2, out / "checkpoint.pth")
    again = build(cfg, data_from_crops(cfg, crops, ["CTIP2", "BRN2", "ROR"]))
    epoch = resume(again, out / "checkpoint.pth")
    same = all(torch.equal(a, b) for a, b in zip(tr.teacher.state_dict().values(), again.teacher.state_dict().values()))
    finite = all(np.isfinite(v) for v in losses)
    return {
        "losses": losses,
        "reloaded_epoch": epoch,
        "reload_equal": same,
        "amp": str(tr.amp),
        "scaler": tr.scaler is not None,
        "ok": finite and same and epoch == 2,
    }


def check_training_cpu(quick: bool) -> dict:
    """A few training steps on the CPU (fp32), a checkpoint, and its reload."""
    with tempfile.TemporaryDirectory() as tmp:
        return _train_steps("cpu", "fp32", Path(tmp))


def check_training_bf16(quick: bool) -> dict:
    """A few training steps on CUDA in bf16 autocast, a checkpoint, and its reload."""
    cuda()
    if not torch.cuda.is_bf16_supported():
        raise Skip("this GPU has no bf16")
    with tempfile.TemporaryDirectory() as tmp:
        return _train_steps("cuda", "bf16", Path(tmp))


def check_training_fp16(quick: bool) -> dict:
    """A few training steps on CUDA in fp16 with the gradient scaler, a checkpoint (with the scaler), its reload."""
    cuda()
    with tempfile.TemporaryDirectory() as tmp:
        return _train_steps("cuda", "fp16", Path(tmp))


def check_nccl(quick: bool) -> dict:
    """Single-rank DDP on NCCL: the process group starts on the device and an all-reduce of a CUDA tensor works."""
    cuda()
    import socket

    import torch.distributed as dist

    if not dist.is_nccl_available():
        raise Skip("this PyTorch build has no NCCL")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.cuda.set_device(0)
    dist.init_process_group(
        "nccl", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1, device_id=torch.device("cuda", 0)
    )
    try:
        model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(8, 4).cuda(), device_ids=[0])
        model(torch.randn(5, 8, device="cuda")).sum().backward()
        t = torch.ones(3, device="cuda")
        dist.all_reduce(t)
        ok = bool(torch.equal(t.cpu(), torch.ones(3)))
    finally:
        dist.destroy_process_group()
    return {"all_reduce": ok, "ok": ok}


def check_cuml_umap(quick: bool) -> dict:
    """cuML UMAP on the GPU (the engine's UMAP with --device cuda)."""
    cuda()
    need("cuml")
    from cuml.manifold import UMAP

    x = np.random.default_rng(0).normal(size=(2000, 64)).astype(np.float32)
    t = time.perf_counter()
    xy = UMAP(n_neighbors=30, min_dist=0.4, spread=1.1, n_epochs=200, random_state=0).fit_transform(x)
    return {
        "seconds": round(time.perf_counter() - t, 2),
        "finite": bool(np.isfinite(xy).all()),
        "ok": bool(np.isfinite(xy).all()),
    }


def _export(tmp: Path, precision: str = "fp32", input_size: int = 224, verify_with=None) -> Path:
    need("onnx")
    need("onnxruntime")
    from scdino.export.onnx_export import export_onnx

    path = tmp / f"m_{precision}.onnx"
    export_onnx(
        "random:vit_small16",
        path,
        n_channels=3,
        crop_size=64,
        input_size=input_size,
        precision=precision,
        verify_with=verify_with,
    )
    return path


def check_onnxruntime_cpu(quick: bool) -> dict:
    """The exported graph (preprocessing inside) on ONNX Runtime's CPU provider against PyTorch, on full-span uint16
    crops: the reference the CUDA and TensorRT checks are held to."""
    need("onnxruntime")
    import onnxruntime as ort

    crops = full_span_crops(8)
    size = 112 if quick else 224  # quick: a quarter of the arithmetic; the graph and its preprocessing are the same
    with tempfile.TemporaryDirectory() as tmp:
        m = _export(Path(tmp), input_size=size, verify_with=crops if quick else None)
        got = ort.InferenceSession(str(m), providers=["CPUExecutionProvider"]).run(None, {"crops": crops})[0]
    want = torch_embed("random:vit_small16", crops, "cpu", input_size=size)
    cmin = float(cosine(got, want).min())
    return {"min_cosine": cmin, "finite": bool(np.isfinite(got).all()), "ok": cmin >= 0.9999}


def check_onnxruntime_cuda(quick: bool) -> dict:
    """ONNX Runtime's CUDA provider against its CPU one, on full-span uint16 crops."""
    cuda()
    need("onnxruntime")
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        raise Skip("onnxruntime has no CUDA provider here (install onnxruntime-gpu)")
    crops = full_span_crops(32)
    with tempfile.TemporaryDirectory() as tmp:
        m = _export(Path(tmp))
        cpu = ort.InferenceSession(str(m), providers=["CPUExecutionProvider"]).run(None, {"crops": crops})[0]
        sess = ort.InferenceSession(str(m), providers=["CUDAExecutionProvider"])
        if "CUDAExecutionProvider" not in sess.get_providers():
            return {"ok": False, "error": "the CUDA provider fell back to the CPU (CUDA/cuDNN libraries missing)"}
        gpu = sess.run(None, {"crops": crops})[0]
    cmin = float(cosine(cpu, gpu).min())
    return {"min_cosine": cmin, "ok": cmin >= 0.999}


def _check_tensorrt(precision: str, quick: bool) -> dict:
    cuda()
    need("tensorrt")
    import tensorrt as trt

    from scdino.engine.backends.base import BackendSpec
    from scdino.engine.backends.tensorrt_backend import TensorRTBackend
    from scdino.export.tensorrt_build import build_engine
    from scdino.models.card import describe_model

    crops = full_span_crops(256 if quick else 1024)
    with tempfile.TemporaryDirectory() as tmp:
        strong = int(trt.__version__.split(".")[0]) >= 11 or precision == "fp16"
        src = _export(Path(tmp), "fp16" if precision == "fp16" and strong else "fp32")
        ref = torch_embed("random:vit_small16", crops[:64], "cpu", input_size=224)
        plan = Path(tmp) / f"m_{precision}.plan"
        meta = build_engine(src, plan, fp16=precision == "fp16", int8=precision == "int8", max_batch=256)
        card = describe_model(str(plan), n_channels=3)
        b = TensorRTBackend(BackendSpec(card=card, n_channels=3, kind="tensorrt", device="cuda", batch_size=256))
        got = b.infer(crops[:64])
        b.infer(crops[:256])
        torch.cuda.synchronize()
        t = time.perf_counter()
        b.infer(crops)
        torch.cuda.synchronize()
        rate = len(crops) / (time.perf_counter() - t)
        b.close()
    cmin = float(cosine(ref, got).min())
    floor = 0.99 if precision == "int8" else 0.999
    return {
        "asked": precision,
        "inspected_precision": meta["precision"],
        "layers": meta["tensorrt"]["layer_precisions"],
        # how the inspector was read on this TensorRT (keys, schema, votes, I/O check) and the profile built
        "precision_from": meta["tensorrt"]["precision_from"],
        "precision_report": meta["tensorrt"]["precision_report"],
        "profile": meta["tensorrt"]["profile"],
        "min_cosine_to_fp32": cmin,
        "cells_per_s": round(rate, 1),
        "ok": cmin >= floor,
    }


def check_tensorrt_fp16(quick: bool) -> dict:
    """A TensorRT fp16 plan: cosine to fp32 on full-span uint16 crops, cells/s, the precision the inspector reports."""
    return _check_tensorrt("fp16", quick)


def check_tensorrt_int8(quick: bool) -> dict:
    """A TensorRT int8 (Q/DQ) plan: the same measures."""
    return _check_tensorrt("int8", quick)


CHECKS: list[Callable[[bool], dict]] = [
    check_device_preprocessing,
    check_torch_backend,
    check_throughput,
    check_knn,
    check_training_cpu,
    check_training_bf16,
    check_training_fp16,
    check_nccl,
    check_cuml_umap,
    check_onnxruntime_cpu,
    check_onnxruntime_cuda,
    check_tensorrt_fp16,
    check_tensorrt_int8,
]


def run_check(fn: Callable[[bool], dict], quick: bool) -> dict:
    name = fn.__name__.removeprefix("check_")
    t = time.perf_counter()
    try:
        res = {"check": name, **fn(quick)}
        res["status"] = "ok" if res.pop("ok", True) else "failed"
    except Skip as exc:
        res = {"check": name, "status": "skipped", "why": str(exc)}
    except Exception as exc:  # a check that breaks is reported, and the others still run
        res = {
            "check": name,
            "status": "failed",
            "error": f"{type(exc).__name__}: {exc}",
            "trace": traceback.format_exc(limit=3),
        }
    res["seconds"] = round(time.perf_counter() - t, 2)
    print(json.dumps(res, default=str), flush=True)
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="Also write all results (and the machine) as JSON here.")
    ap.add_argument("--quick", action="store_true", help="Fewer cells per measurement.")
    ap.add_argument("--only", help="Comma-separated check names.")
    args = ap.parse_args(argv)
    machine = {
        "check": "machine",
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
    }
    print(json.dumps(machine), flush=True)
    wanted = set(args.only.split(",")) if args.only else None
    results = [run_check(fn, args.quick) for fn in CHECKS if not wanted or fn.__name__[6:] in wanted]
    if args.out:
        Path(args.out).write_text(json.dumps({"machine": machine, "results": results}, indent=2, default=str))
    return 1 if any(r["status"] == "failed" for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
