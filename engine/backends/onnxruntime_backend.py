"""ONNX Runtime backend for models exported by ``scdino-export onnx`` (preprocessing is inside the graph).

CPU: intra-op threads = the worker's share of the cores, one inter-op thread, full graph optimisation; each batch is
one ``session.run`` on numpy arrays.

CUDA (``onnxruntime-gpu`` and ``--device cuda``): the feeding of the other GPU backends. A block's raw crops (the
plate's dtype, as the exported graph takes them) are copied to the GPU once, each batch's input is bound to its rows
there and its output to its rows of one device buffer for the block (IO binding), and the block's embeddings are
copied back once, so that ONNX Runtime neither allocates nor copies per ``run``. A session that silently fell back to
the CPU is an error, not a slow surprise.
"""

from __future__ import annotations

import importlib.metadata as md
import logging

import numpy as np

from scdino._optional import pip_extra
from scdino.engine.backends.base import BackendSpec, check_crops
from scdino.errors import CheckpointError, ConfigError, ScdinoError

log = logging.getLogger(__name__)


def ort_distributions() -> list[str]:
    """Installed distributions that provide the ``onnxruntime`` module."""
    found = []
    for name in ("onnxruntime", "onnxruntime-gpu", "onnxruntime-directml", "onnxruntime-openvino"):
        try:
            md.version(name)
            found.append(name)
        except md.PackageNotFoundError:
            pass
    return found


def import_ort():
    """Import onnxruntime, refusing the broken state where two of its distributions overwrote each other."""
    dists = ort_distributions()
    if len(dists) > 1:
        raise ConfigError(
            f"{' and '.join(dists)} are both installed; they provide the same module and overwrite each other. "
            f"Run: pip uninstall -y {' '.join(dists)}, then {pip_extra('onnx')} (CPU) or {pip_extra('gpu')} (CUDA)"
        )
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise ConfigError(
            f"ONNX Runtime is not installed ({exc}); run: {pip_extra('onnx')} (CPU) or {pip_extra('gpu')} (NVIDIA GPU)"
        ) from exc
    return ort


_CUDA_WORKS: bool | None = None

#: the CUDA device a session and its bound buffers use: each worker sees its own GPU as device 0
#: (scdino.engine.cluster pins one GPU per worker)
DEVICE_ID = 0

#: what the CUDA provider needs, for the messages when it does not load
CUDA_LIBRARIES = (
    "CUDA 13 and cuDNN 9 (pip install 'nvidia-cuda-runtime>=13' 'nvidia-cublas>=13' nvidia-cufft nvidia-curand "
    "nvidia-cudnn-cu13, then onnxruntime.preload_dlls() finds them; or a CUDA 13 image)"
)

#: run in a child process: a one-node model made with onnx's helpers in a CUDA session; prints the providers it got
_PROBE = """
import json, onnxruntime as ort
if hasattr(ort, "preload_dlls"):
    ort.preload_dlls()
from onnx import TensorProto, helper
x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
g = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "probe", [x], [y])
m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
m.ir_version = min(m.ir_version, 9)
s = ort.InferenceSession(m.SerializeToString(), providers=["CUDAExecutionProvider"])
print(json.dumps(s.get_providers()))
"""


def cuda_works() -> bool:
    """Whether a real ONNX Runtime session gets the CUDA provider here. The probe (a one-node model, the CUDA
    libraries preloaded first where ORT can: ``onnxruntime.preload_dlls``, ORT >= 1.21) runs in a child process, so
    that this process holds no CUDA context for the rest of the run. Cached."""
    import json
    import subprocess
    import sys

    global _CUDA_WORKS
    if _CUDA_WORKS is not None:
        return _CUDA_WORKS
    ort = import_ort()
    _CUDA_WORKS = False
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return False
    try:
        p = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, timeout=120)
        got = json.loads(p.stdout.strip().splitlines()[-1]) if p.returncode == 0 and p.stdout.strip() else []
    except (OSError, subprocess.TimeoutExpired, ValueError) as exc:
        log.warning("ONNX Runtime lists CUDA but the probe of it failed (%s); using the CPU", exc)
        return False
    if p.returncode != 0 and "No module named 'onnx'" in p.stderr:
        log.warning(
            "cannot probe ONNX Runtime's CUDA provider without the onnx package (pip install onnx); using the CPU"
        )
        return False
    _CUDA_WORKS = "CUDAExecutionProvider" in got
    if not _CUDA_WORKS:
        log.warning(
            "ONNX Runtime lists the CUDA provider but a session falls back to the CPU: the CUDA libraries it needs, "
            "%s, are not found. --device auto uses the CPU; install them to use the GPU",
            CUDA_LIBRARIES,
        )
    return _CUDA_WORKS


def providers_for(device: str) -> list[str]:
    ort = import_ort()
    avail = ort.get_available_providers()
    if device == "cuda":
        if "CUDAExecutionProvider" not in avail:
            raise ConfigError(
                f"--device cuda with ONNX Runtime needs onnxruntime-gpu; this installation offers {', '.join(avail)}. "
                f"Run: pip uninstall -y onnxruntime, then {pip_extra('gpu')}"
            )
        # not the TensorRT provider: without an engine cache it rebuilds per batch shape; use scdino-export tensorrt.
        return [("CUDAExecutionProvider", {"device_id": DEVICE_ID}), "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def warn_int8_form(model) -> bool:
    """Warn (and return True) when an int8 model was quantised with full 8-bit signed weights, which only a CPU with
    VNNI sums without saturating, and this CPU has none."""
    from scdino.cpu import has_vnni
    from scdino.models.sidecar import read_sidecar

    try:
        q = read_sidecar(model).get("quantization") or {}
    except (ScdinoError, OSError):  # a model without a readable sidecar says nothing about its weights
        return False
    if not q.get("needs_vnni") or has_vnni():
        return False
    log.warning(
        "%s: int8 with %s weights was made on a CPU with VNNI; this CPU has none and its int16 sums can saturate "
        "(embeddings off by far more than the check measured). Quantise it again here: scdino-export quantize",
        model,
        q.get("weights"),
    )
    return True


class OnnxRuntimeBackend:
    name = "onnxruntime"

    def __init__(self, spec: BackendSpec) -> None:
        ort = import_ort()
        self.spec = spec
        card = spec.card  # channels were checked when the card was made
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.intra_op_num_threads = spec.threads or 0
        opts.inter_op_num_threads = 1
        wanted = providers_for(spec.device)
        try:
            self.session = ort.InferenceSession(str(spec.model), opts, providers=wanted)
        except Exception as exc:  # ONNX Runtime's own error types (InvalidProtobuf, InvalidGraph, Fail, ...)
            raise CheckpointError(
                f"{spec.model}: ONNX Runtime cannot load it ({type(exc).__name__}: {str(exc)[:200]}); export it again "
                "with scdino-export onnx"
            ) from exc
        got = self.session.get_providers()
        if spec.device == "cuda" and "CUDAExecutionProvider" not in got and "TensorrtExecutionProvider" not in got:
            raise ConfigError(
                f"{spec.model}: ONNX Runtime fell back to the CPU ({', '.join(got)}): the CUDA libraries it needs, "
                f"{CUDA_LIBRARIES}, were not found. Install them or run with --device cpu"
            )
        if card.precision == "int8" and spec.device == "cpu":
            warn_int8_form(spec.model)
        self.dtype = np.dtype(card.dtype)
        self.embed_dim = card.embed_dim
        #: CUDA: OrtValue, to put a block's crops and embeddings on the device
        self.ortvalue = ort.OrtValue if spec.device == "cuda" else None
        self.info = {
            "backend": "onnxruntime",
            "device": spec.device,
            "providers": got,
            "onnxruntime": ort.__version__,
            "precision": card.precision,
            "threads": spec.threads,
            **({"io_binding": True} if spec.device == "cuda" else {}),
        }

    def _cast(self, crops: np.ndarray) -> np.ndarray:
        if crops.dtype == self.dtype:
            return crops
        if not np.can_cast(crops.dtype, self.dtype, "safe"):
            raise ConfigError(
                f"{self.spec.model}: exported for {self.dtype} crops, the plate gives {crops.dtype}; "
                f"export again with --dtype {crops.dtype}"
            )
        return crops.astype(self.dtype)

    def infer(self, crops: np.ndarray) -> np.ndarray:
        check_crops(crops, self.spec.n_channels)
        x = self._cast(np.ascontiguousarray(crops))
        if self.ortvalue is not None:
            return self._infer_bound(x)
        bs = self.spec.batch_size
        out = np.empty((len(x), self.embed_dim), np.float32)
        for i in range(0, len(x), bs):
            out[i : i + bs] = self.session.run(["cls"], {"crops": x[i : i + bs]})[0]
        return out

    def _infer_bound(self, x: np.ndarray) -> np.ndarray:
        """CUDA: the block's crops copied to the device once, each batch bound to its rows of them and of one device
        output, the embeddings copied back once. A binding and buffers per call: threads sharing the backend (a
        worker's) never share them."""
        n, bs, dim = len(x), self.spec.batch_size, self.embed_dim
        crops = self.ortvalue.ortvalue_from_numpy(x, "cuda", DEVICE_ID)
        out = self.ortvalue.ortvalue_from_shape_and_type([n, dim], np.float32, "cuda", DEVICE_ID)
        crop_bytes, row_bytes = x[0].nbytes, dim * np.dtype(np.float32).itemsize
        binding = self.session.io_binding()
        for i in range(0, n, bs):
            m = min(bs, n - i)
            binding.bind_input(
                "crops", "cuda", DEVICE_ID, x.dtype.type, [m, *x.shape[1:]], crops.data_ptr() + i * crop_bytes
            )
            binding.bind_output("cls", "cuda", DEVICE_ID, np.float32, [m, dim], out.data_ptr() + i * row_bytes)
            self.session.run_with_iobinding(binding)
        return out.numpy()

    def close(self) -> None:
        del self.session
