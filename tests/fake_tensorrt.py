"""A stand-in for NVIDIA's ``tensorrt`` module where it cannot be installed (no GPU here): the part of the TensorRT 10
and 11 Python API that scdino calls, under the same names, with the same signatures and return shapes (NVIDIA's
Python API reference: ``Runtime.deserialize_cuda_engine``; ``ICudaEngine.num_io_tensors``, ``get_tensor_name``,
``get_tensor_mode``, ``get_tensor_dtype``, ``get_tensor_shape``, ``get_tensor_profile_shape(name, profile_index)`` ->
[min, opt, max], ``create_execution_context``, ``create_engine_inspector``; ``IExecutionContext.set_input_shape``
(False for a shape outside the profile), ``set_tensor_address``, ``execute_async_v3``;
``EngineInspector.get_engine_information(LayerInformationFormat.JSON)``; ``Builder``, ``IBuilderConfig``,
``IOptimizationProfile.set_shape(input, min, opt, max)``, ``OnnxParser.parse_from_file``; the ``DataType`` and
``TensorIOMode`` enums with the module's ``trt.float32`` ... aliases; ``BuilderFlag`` without FP16/INT8 in 11).

A "plan" here is JSON: the engine's I/O tensors and the inspector report it gives (the JSON TensorRT 10 or 11 writes,
``tests/data/tensorrt1*_inspector.json``). The model an execution context runs: each crop's per-channel pixel sums,
tiled to the output width, computed when it runs from whatever its input buffer then holds (as a GPU would).
"""

from __future__ import annotations

import enum
import json
import time
import types
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch

DATA = Path(__file__).resolve().parent / "data"


class DataType(enum.Enum):
    FLOAT = 0
    HALF = 1
    INT8 = 2
    INT32 = 3
    BOOL = 4
    UINT8 = 5
    FP8 = 6
    BF16 = 7
    INT64 = 8


class TensorIOMode(enum.Enum):
    NONE = 0
    INPUT = 1
    OUTPUT = 2


class LayerInformationFormat(enum.Enum):
    ONELINE = 0
    JSON = 1


class ProfilingVerbosity(enum.Enum):
    LAYER_NAMES_ONLY = 0
    NONE = 1
    DETAILED = 2


class MemoryPoolType(enum.Enum):
    WORKSPACE = 0


class NetworkDefinitionCreationFlag(enum.IntEnum):
    STRONGLY_TYPED = 5


class LayerType(enum.Enum):
    CONVOLUTION = 0
    NORMALIZATION = 1


#: ONNX element types -> TensorRT's (uint16 is not one: the parser refuses it, as TensorRT's does)
_ONNX_TYPES = {1: DataType.FLOAT, 2: DataType.UINT8, 3: DataType.INT8, 6: DataType.INT32, 10: DataType.HALF}

#: the buffer types of TensorRT's types
_TORCH = {
    DataType.FLOAT: torch.float32,
    DataType.HALF: torch.float16,
    DataType.INT8: torch.int8,
    DataType.INT32: torch.int32,
    DataType.UINT8: torch.uint8,
}

# ---------------------------------------------------------------------------------------------------- device memory

#: "device" buffers by address: what set_tensor_address points an execution context at
_TENSORS: dict[int, torch.Tensor] = {}


class HostMemory:
    """The TensorRT backend's device operations on host tensors: streams and events that are no-ops."""

    class _Stream:
        def __enter__(self):
            return self

        def __exit__(self, *a):
            return False

    class _Event:
        def record(self, stream):
            pass

        def synchronize(self):
            pass

    def stream(self):
        return self._Stream()

    def event(self):
        return self._Event()

    def use(self, stream):
        return stream

    def _keep(self, t):
        _TENSORS[t.data_ptr()] = t
        return t

    def pinned(self, shape, dtype):
        return self._keep(torch.zeros(shape, dtype=dtype))

    def device(self, shape, dtype):
        return self._keep(torch.zeros(shape, dtype=dtype))

    def handle(self, stream):
        return 0


# ---------------------------------------------------------------------------------------------------- runtime


class FakeContext:
    """An ``IExecutionContext``. Class attributes steer failures: ``skip_rows`` rows left unwritten, the
    ``fail_on_call``-th execution (1-based) fails; ``shapes`` records every input shape set."""

    skip_rows = 0
    fail_on_call = 0
    calls = 0
    shapes: ClassVar[list[tuple]] = []

    def __init__(self, engine: ICudaEngine):
        self.engine, self.shape, self.addr = engine, None, {}
        self.input, self.output = engine.input, engine.output

    def set_input_shape(self, name, shape):
        low, _, high = self.engine.get_tensor_profile_shape(name, 0)
        shape = tuple(shape)
        if len(shape) != len(low) or any(not lo <= d <= hi for d, lo, hi in zip(shape, low, high)):
            return False  # TensorRT: a shape outside the optimisation profile is refused
        FakeContext.shapes.append(shape)
        self.shape = shape
        return True

    def set_tensor_address(self, name, ptr):
        if name not in (self.input, self.output):
            raise RuntimeError(f"no tensor {name!r} in this engine")
        self.addr[name] = _TENSORS[ptr]
        return True

    def execute_async_v3(self, stream_handle):
        FakeContext.calls += 1
        if FakeContext.calls == FakeContext.fail_on_call:
            return False
        time.sleep(0.002)
        n, dim = self.shape[0], self.engine.get_tensor_shape(self.output)[-1]
        x = self._memory(self.input)[: int(np.prod(self.shape))].reshape(self.shape).double().sum(dim=(2, 3))
        y = x.repeat(1, dim // x.shape[1])
        keep = n - FakeContext.skip_rows
        self._memory(self.output)[: keep * dim] = (
            y[:keep].reshape(-1).to(_TORCH[self.engine.get_tensor_dtype(self.output)])
        )
        return True

    def _memory(self, name) -> torch.Tensor:
        """The bytes at a tensor's address as the engine's type for it (as a GPU kernel sees them: a buffer of
        another type is read and written as garbage)."""
        dtype = _TORCH[self.engine.get_tensor_dtype(name)]
        return self.addr[name].reshape(-1).view(torch.uint8).view(dtype)


class EngineInspector:
    def __init__(self, report: str | None):
        self.report = report
        self.execution_context = None

    def get_engine_information(self, format):
        if self.report is None:
            return ""  # built without detailed profiling: nothing to read
        if format != LayerInformationFormat.JSON:
            return "\n".join(layer.get("Name", "") for layer in json.loads(self.report)["Layers"])
        return self.report


class ICudaEngine:
    """An engine from a JSON plan: ``{"io": [{name, mode, dtype, shape, profile}], "inspector": text | None}``."""

    num_optimization_profiles = 1

    def __init__(self, plan: dict):
        self.plan = plan
        self._io = {t["name"]: t for t in plan["io"]}
        self.input = next(t["name"] for t in plan["io"] if t["mode"] == "INPUT")
        self.output = next(t["name"] for t in plan["io"] if t["mode"] == "OUTPUT")

    @property
    def num_io_tensors(self) -> int:
        return len(self.plan["io"])

    def get_tensor_name(self, index):
        return self.plan["io"][index]["name"]

    def get_tensor_mode(self, name):
        return TensorIOMode[self._io[name]["mode"]] if name in self._io else TensorIOMode.NONE

    def get_tensor_dtype(self, name):
        return DataType[self._io[name]["dtype"]]

    def get_tensor_shape(self, name):
        return tuple(self._io[name]["shape"])

    def get_tensor_profile_shape(self, name, profile_index):
        t = self._io[name]
        if t["mode"] != "INPUT" or profile_index != 0:
            raise RuntimeError(f"no profile shape for {name!r} in profile {profile_index}")
        return [tuple(s) for s in t["profile"]]

    def create_execution_context(self):
        return FakeContext(self)

    def create_engine_inspector(self):
        return EngineInspector(self.plan.get("inspector"))


class Logger:
    WARNING = 2

    def __init__(self, level=WARNING):
        self.level = level


class Runtime:
    def __init__(self, logger):
        self.logger = logger

    def deserialize_cuda_engine(self, serialized_engine):
        try:
            return ICudaEngine(json.loads(bytes(serialized_engine)))
        except (ValueError, KeyError, StopIteration, TypeError):
            return None  # TensorRT logs the error and returns None


# ---------------------------------------------------------------------------------------------------- builder


class ITensor:
    def __init__(self, name, dtype, shape):
        self.name, self.dtype, self.shape = name, dtype, tuple(shape)


class INetworkDefinition:
    def __init__(self, flags):
        self.flags = flags
        self.inputs: list[ITensor] = []
        self.outputs: list[ITensor] = []
        self.num_layers = 0

    def get_input(self, index):
        return self.inputs[index]

    def get_output(self, index):
        return self.outputs[index]


class OnnxParser:
    """Reads the ONNX graph's input and output (name, type, shape); refuses a uint16 input as TensorRT does."""

    def __init__(self, network, logger):
        self.network, self.errors = network, []
        network.source = None

    @property
    def num_errors(self):
        return len(self.errors)

    def get_error(self, index):
        return self.errors[index]

    def parse_from_file(self, model):
        import onnx

        graph = onnx.load(model).graph

        def tensor(v):
            elem = v.type.tensor_type.elem_type
            dims = [d.dim_value if d.HasField("dim_value") else -1 for d in v.type.tensor_type.shape.dim]
            return ITensor(v.name, _ONNX_TYPES.get(elem), dims), elem

        for v, into in ((graph.input[0], self.network.inputs), *((o, self.network.outputs) for o in graph.output)):
            t, elem = tensor(v)
            if t.dtype is None:
                self.errors.append(f"{v.name}: ONNX element type {elem} is not supported by TensorRT")
                return False
            into.append(t)
        self.network.source = model
        return True


class IOptimizationProfile:
    def __init__(self):
        self.shapes: dict[str, tuple] = {}

    def set_shape(self, input, min, opt, max):
        self.shapes[input] = (tuple(min), tuple(opt), tuple(max))


class ITimingCache:
    def __init__(self, data: bytes):
        self.data = data

    def serialize(self):
        return b"timing cache"


class IBuilderConfig:
    def __init__(self):
        self.flags: list[str] = []
        self.profiles: list[IOptimizationProfile] = []
        self.profiling_verbosity = ProfilingVerbosity.LAYER_NAMES_ONLY
        self.cache = None

    def set_memory_pool_limit(self, pool, pool_size):
        self.workspace = pool_size

    def create_timing_cache(self, serialized_timing_cache):
        return ITimingCache(serialized_timing_cache)

    def set_timing_cache(self, cache, ignore_mismatch):
        self.cache = cache
        return True

    def get_timing_cache(self):
        return self.cache

    def set_flag(self, flag):
        self.flags.append(flag.name)

    def add_optimization_profile(self, profile):
        self.profiles.append(profile)
        return len(self.profiles) - 1


class Builder:
    """Builds a JSON plan of the parsed network's input and output with the config's profile; the inspector report is
    the module's ``INSPECTOR`` (when built with detailed profiling). Each build is recorded in the module's
    ``BUILDS``."""

    trt: types.ModuleType  # set by make()

    def __init__(self, logger):
        self.logger = logger

    def create_network(self, flags=0):
        return INetworkDefinition(flags)

    def create_builder_config(self):
        return IBuilderConfig()

    def create_optimization_profile(self):
        return IOptimizationProfile()

    def build_serialized_network(self, network, config):
        inp, out = network.get_input(0), network.get_output(0)
        low, opt, high = config.profiles[0].shapes[inp.name]
        if any(d < 0 for d in out.shape[1:]):  # TensorRT infers the static dims the graph leaves symbolic: run it once
            import onnxruntime as ort

            session = ort.InferenceSession(network.source, providers=["CPUExecutionProvider"])
            x = np.zeros(low, {DataType.INT32: np.int32, DataType.UINT8: np.uint8}.get(inp.dtype, np.float32))
            width = session.run([out.name], {inp.name: x})[0].shape[1:]
            out = ITensor(out.name, out.dtype, (-1, *width))
        detailed = config.profiling_verbosity == ProfilingVerbosity.DETAILED
        self.trt.BUILDS.append(
            {"network_flags": network.flags, "flags": list(config.flags), "profile": (low, opt, high)}
        )
        plan = {
            "io": [
                {
                    "name": inp.name,
                    "mode": "INPUT",
                    "dtype": inp.dtype.name,
                    "shape": inp.shape,
                    "profile": [low, opt, high],
                },
                {"name": out.name, "mode": "OUTPUT", "dtype": out.dtype.name, "shape": out.shape},
            ],
            "inspector": self.trt.INSPECTOR if detailed else None,
        }
        return json.dumps(plan).encode()


# ---------------------------------------------------------------------------------------------------- the module


def inspector_sample(major: int) -> str:
    """The inspector JSON TensorRT ``major`` (10 or 11) writes for a ViT-test/8 fp16 plan (see the file's comment)."""
    return (DATA / f"tensorrt{major}_inspector.json").read_text()


def make(version: str = "10.9.0", inspector: str | None = None) -> types.ModuleType:
    """A ``tensorrt`` module of ``version``; plans it builds carry ``inspector`` (default: the sample JSON of that
    major version)."""
    major = int(version.split(".")[0])
    trt = types.ModuleType("tensorrt")
    trt.__version__ = version
    trt.INSPECTOR = inspector if inspector is not None else inspector_sample(major)
    trt.BUILDS = []
    for cls in (DataType, TensorIOMode, LayerInformationFormat, ProfilingVerbosity, MemoryPoolType, LayerType):
        setattr(trt, cls.__name__, cls)
    trt.NetworkDefinitionCreationFlag = NetworkDefinitionCreationFlag
    # TensorRT 11 removed the weak-typing flags (FP16, INT8, OBEY_PRECISION_CONSTRAINTS, ...)
    flags = ["REFIT", "DEBUG"] + (["FP16", "INT8", "OBEY_PRECISION_CONSTRAINTS"] if major < 11 else [])
    trt.BuilderFlag = enum.IntEnum("BuilderFlag", flags)
    aliases = {
        "float32": "FLOAT",
        "float16": "HALF",
        "int8": "INT8",
        "int32": "INT32",
        "bool": "BOOL",
        "uint8": "UINT8",
    }
    for alias, member in aliases.items():
        setattr(trt, alias, DataType[member])
    trt.Logger, trt.Runtime, trt.OnnxParser = Logger, Runtime, OnnxParser
    trt.Builder = type("Builder", (Builder,), {"trt": trt})
    return trt


def write_plan(
    path,
    *,
    channels: int = 2,
    crop: int = 8,
    width: int = 6,
    batches: tuple[int, int, int] = (1, 4, 256),
    names: tuple[str, str] = ("crops", "cls"),
    dtypes: tuple[str, str] = ("INT32", "FLOAT"),
    inspector: str | None = None,
) -> Path:
    """A JSON plan file as :class:`Runtime` reads it."""
    profile = [(b, channels, crop, crop) for b in batches]
    inp = {"name": names[0], "mode": "INPUT", "dtype": dtypes[0], "shape": [-1, channels, -1, -1], "profile": profile}
    out = {"name": names[1], "mode": "OUTPUT", "dtype": dtypes[1], "shape": [-1, width]}
    plan = {"io": [inp, out], "inspector": inspector}
    Path(path).write_text(json.dumps(plan))
    return Path(path)


def expected(crops: np.ndarray, dim: int) -> np.ndarray:
    """What the stand-in's model gives for ``crops``."""
    x = crops.astype(np.float64).sum(axis=(2, 3))
    return np.tile(x, (1, dim // x.shape[1])).astype(np.float32)
