"""ONNX Runtime on CUDA feeds by IO binding, checked on the CPU with a stub of ONNX Runtime's API that records the calls:
``OrtValue.ortvalue_from_numpy(arr, "cuda", 0)``, ``OrtValue.ortvalue_from_shape_and_type``, ``data_ptr()``,
``numpy()``; ``InferenceSession.io_binding()``, ``run_with_iobinding``; ``IOBinding.bind_input(name, device_type,
device_id, element_type, shape, buffer_ptr)`` and ``bind_output`` of the same form. Device memory is byte arrays at
made-up addresses, so a binding at the wrong offset reads or writes the wrong rows. (The real CUDA path against the CPU
path: tests/test_gpu.py.)"""

import numpy as np
import pytest

from conftest import stand_in_card
from scdino.engine.backends import onnxruntime_backend as ortb
from scdino.engine.backends.base import BackendSpec

DIM = 6


def model(x: np.ndarray) -> np.ndarray:
    """The stub's "graph": each crop's per-channel pixel sums, tiled to the embedding width."""
    s = x.astype(np.float64).sum(axis=(2, 3))
    return np.tile(s, (1, DIM // s.shape[1])).astype(np.float32)


class Memory:
    """CUDA memory: byte arrays at made-up addresses; a view past an allocation's end is an error (a CUDA fault)."""

    def __init__(self):
        self.blocks: dict[int, np.ndarray] = {}
        self.next = 1 << 20

    def alloc(self, nbytes: int) -> int:
        ptr, self.next = self.next, self.next + nbytes + 4096
        self.blocks[ptr] = np.zeros(nbytes, np.uint8)
        return ptr

    def at(self, ptr: int, dtype, shape) -> np.ndarray:
        base = max(b for b in self.blocks if b <= ptr)
        dtype = np.dtype(dtype)
        off, nbytes = ptr - base, int(np.prod(shape)) * dtype.itemsize
        if off + nbytes > len(self.blocks[base]):
            raise RuntimeError(f"CUDA error: illegal address {ptr:#x} + {nbytes} bytes")
        return self.blocks[base][off : off + nbytes].view(dtype).reshape(shape)


def stub_ort(calls: list, graph_dtype=np.uint16):
    """An ``onnxruntime`` module stub whose sessions run :func:`model` on a graph input of ``graph_dtype``."""
    mem = Memory()

    class OrtValue:
        def __init__(self, ptr, dtype, shape, device):
            self.ptr, self.dtype, self._shape, self.device = ptr, np.dtype(dtype), list(shape), device

        @classmethod
        def ortvalue_from_numpy(cls, numpy_obj, device_type="cpu", device_id=0):
            calls.append(("ortvalue_from_numpy", device_type, device_id, numpy_obj.dtype, numpy_obj.shape))
            v = cls(mem.alloc(numpy_obj.nbytes), numpy_obj.dtype, numpy_obj.shape, device_type)
            mem.at(v.ptr, v.dtype, v._shape)[...] = numpy_obj
            return v

        @classmethod
        def ortvalue_from_shape_and_type(cls, shape, element_type, device_type="cpu", device_id=0):
            calls.append(("ortvalue_from_shape_and_type", device_type, device_id, np.dtype(element_type), list(shape)))
            return cls(
                mem.alloc(int(np.prod(shape)) * np.dtype(element_type).itemsize), element_type, shape, device_type
            )

        def data_ptr(self):
            return self.ptr

        def shape(self):
            return self._shape

        def numpy(self):
            calls.append(("numpy", self.device))
            return mem.at(self.ptr, self.dtype, self._shape).copy()

    class IOBinding:
        def __init__(self):
            self.inputs, self.outputs = {}, {}

        def bind_input(self, name, device_type, device_id, element_type, shape, buffer_ptr):
            calls.append(("bind_input", name, device_type, device_id, np.dtype(element_type), list(shape)))
            self.inputs[name] = (buffer_ptr, element_type, shape)

        def bind_output(self, name, device_type="cpu", device_id=0, element_type=None, shape=None, buffer_ptr=None):
            calls.append(("bind_output", name, device_type, device_id, np.dtype(element_type), list(shape)))
            self.outputs[name] = (buffer_ptr, element_type, shape)

    class InferenceSession:
        def __init__(self, path, sess_options=None, providers=None):
            self.providers = [p[0] if isinstance(p, tuple) else p for p in providers]

        def get_providers(self):
            return self.providers

        def io_binding(self):
            calls.append(("io_binding",))
            return IOBinding()

        def run_with_iobinding(self, iobinding, run_options=None):
            calls.append(("run_with_iobinding",))
            ptr, dtype, shape = iobinding.inputs["crops"]
            if np.dtype(dtype) != np.dtype(graph_dtype):
                raise RuntimeError(
                    f"Unexpected input data type. Actual: ({np.dtype(dtype)}), expected: ({graph_dtype})"
                )
            y = model(mem.at(ptr, dtype, shape))
            ptr, dtype, shape = iobinding.outputs["cls"]
            mem.at(ptr, dtype, shape)[...] = y

        def run(self, output_names, input_feed, run_options=None):
            calls.append(("run", len(input_feed["crops"])))
            return [model(input_feed["crops"])]

    class SessionOptions:
        pass

    class GraphOptimizationLevel:
        ORT_ENABLE_ALL = 99

    return type(
        "onnxruntime",
        (),
        {
            "__version__": "1.32.0",
            "OrtValue": OrtValue,
            "InferenceSession": InferenceSession,
            "SessionOptions": SessionOptions,
            "GraphOptimizationLevel": GraphOptimizationLevel,
            "get_available_providers": staticmethod(lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"]),
        },
    )


def spec(device: str, batch: int = 4) -> BackendSpec:
    card = stand_in_card(spec="m.onnx", format="onnx", embed_dim=DIM)
    return BackendSpec(card=card, n_channels=2, kind="onnxruntime", device=device, batch_size=batch)


def crops(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 60000, size=(n, 2, 8, 8)).astype(np.uint16)


def test_cuda_binds_the_raw_crops_and_copies_each_block_back_once(monkeypatch):
    calls: list = []
    monkeypatch.setattr(ortb, "import_ort", lambda: stub_ort(calls))
    backend = ortb.OnnxRuntimeBackend(spec("cuda"))
    assert backend.info["io_binding"] is True
    x = crops(10)
    np.testing.assert_allclose(backend.infer(x), model(x))
    # the block's raw crops (uint16, as the graph takes them) to the GPU once; one device output for the block
    assert calls[0] == ("ortvalue_from_numpy", "cuda", 0, np.dtype(np.uint16), (10, 2, 8, 8))
    assert calls[1] == ("ortvalue_from_shape_and_type", "cuda", 0, np.dtype(np.float32), [10, DIM])
    # batches of 4, 4, 2 bound to their rows; no session.run (ONNX Runtime would allocate and copy per call)
    bound = [c for c in calls if c[0] == "bind_input"]
    assert [c[5][0] for c in bound] == [4, 4, 2] and all(c[4] == np.uint16 and c[2] == "cuda" for c in bound)
    assert [c[5] for c in calls if c[0] == "bind_output"] == [[4, DIM], [4, DIM], [2, DIM]]
    assert sum(c[0] == "run_with_iobinding" for c in calls) == 3 and not any(c[0] == "run" for c in calls)
    assert [c for c in calls if c[0] == "numpy"] == [("numpy", "cuda")]  # copied back once
    # another block of another size: its own buffers, right rows
    calls.clear()
    y = crops(3, seed=1)
    np.testing.assert_allclose(backend.infer(y), model(y))
    assert sum(c[0] == "run_with_iobinding" for c in calls) == 1


def test_the_cpu_path_runs_numpy_batches_without_binding(monkeypatch):
    calls: list = []
    monkeypatch.setattr(ortb, "import_ort", lambda: stub_ort(calls))
    backend = ortb.OnnxRuntimeBackend(spec("cpu"))
    x = crops(10)
    np.testing.assert_allclose(backend.infer(x), model(x))
    assert calls == [("run", 4), ("run", 4), ("run", 2)] and "io_binding" not in backend.info


def test_a_cuda_session_that_fell_back_to_the_cpu_names_the_cuda_13_libraries(monkeypatch):
    calls: list = []
    ort = stub_ort(calls)
    ort.InferenceSession.get_providers = lambda self: ["CPUExecutionProvider"]
    monkeypatch.setattr(ortb, "import_ort", lambda: ort)
    with pytest.raises(ortb.ConfigError, match="m.onnx: ONNX Runtime fell back to the CPU.*CUDA 13 and cuDNN 9"):
        ortb.OnnxRuntimeBackend(spec("cuda"))
