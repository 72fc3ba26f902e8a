"""TensorRT plans are tied to the GPU and TensorRT version they were built with: their identity and its check."""

from __future__ import annotations

from scdino.errors import CheckpointError, ConfigError


def gpu_identity() -> dict:
    """Name and compute capability of the current CUDA device."""
    import torch

    if not torch.cuda.is_available():
        raise ConfigError("TensorRT needs an NVIDIA GPU and a CUDA build of PyTorch; none is visible here")
    major, minor = torch.cuda.get_device_capability()
    return {"gpu": torch.cuda.get_device_name(), "compute_capability": f"{major}.{minor}"}


def check_plan(meta: dict, trt_version: str, gpu: dict, plan: str = "model.plan") -> None:
    """Refuse a plan built for another GPU or TensorRT version."""
    built = meta.get("tensorrt") or {}
    problems = []
    if built.get("version") != trt_version:
        problems.append(f"TensorRT {built.get('version')} (this machine: {trt_version})")
    if built.get("compute_capability") != gpu["compute_capability"] or built.get("gpu") != gpu["gpu"]:
        problems.append(
            f"GPU {built.get('gpu')} sm {built.get('compute_capability')} "
            f"(this machine: {gpu['gpu']} sm {gpu['compute_capability']})"
        )
    if problems:
        src = meta.get("source_onnx", "model.onnx")
        raise CheckpointError(
            f"{plan}: built for {' and '.join(problems)}; TensorRT plans only run where they were built. Rebuild it "
            f"on this machine: scdino-export tensorrt {src} --out {plan}"
        )
