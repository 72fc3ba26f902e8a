"""What a built TensorRT plan says about itself, read the same way on TensorRT 10 and 11.

* :func:`plan_io`: its input and output tensors (names, dtypes, shapes) and the batch range of its optimisation
  profile, from the engine's tensor API (``num_io_tensors``, ``get_tensor_name``, ``get_tensor_mode``,
  ``get_tensor_dtype``, ``get_tensor_shape``, ``get_tensor_profile_shape``), the same in both versions;
  :func:`check_plan_io` refuses a plan whose tensors differ from what its sidecar says.
* :func:`read_precision`: the precision the plan's layers compute in, from the engine inspector's JSON
  (``IEngineInspector.get_engine_information(LayerInformationFormat.JSON)`` of a plan built with
  ``ProfilingVerbosity.DETAILED``). Its tensor entries changed between versions: TensorRT 10 writes one combined
  ``"Format/Datatype"`` string per tensor, TensorRT 11 separate ``"Datatype"`` and ``"Format"`` fields; the I/O tensors
  are ``"Bindings"`` (names only) in 10 and ``"I/O Tensors"`` (objects with ``"DataType"``) in 11 (NVIDIA's migration
  guide "Migrating IEngineInspector Usage from TensorRT 10.x to 11.x"; Polygraphy reads both). The per-field keys are
  read where present, the combined one otherwise, and the I/O tensors' types are checked against
  ``get_tensor_dtype``; the report says what was read from where.

Used by the build (:mod:`scdino.export.tensorrt_build`) and by the engine's TensorRT backend.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import asdict, dataclass

from scdino.errors import CheckpointError
from scdino.models.sidecar import sidecar_path

log = logging.getLogger(__name__)

# ------------------------------------------------------------------------------------------------ the plan's tensors

#: TensorRT's data type names (``trt.DataType``) -> numpy's
_NUMPY = {
    "FLOAT": "float32",
    "HALF": "float16",
    "BF16": "bfloat16",
    "INT8": "int8",
    "INT32": "int32",
    "INT64": "int64",
    "UINT8": "uint8",
    "BOOL": "bool",
}


def dtype_name(dtype) -> str:
    """``trt.DataType.HALF`` -> ``"HALF"`` (the enum's member name)."""
    return str(getattr(dtype, "name", None) or str(dtype).rsplit(".", 1)[-1])


def numpy_dtype(dtype) -> str:
    """The numpy name of a ``trt.DataType`` (``float32``, ``int32``, ...)."""
    name = dtype_name(dtype)
    return _NUMPY.get(name, name.lower())


@dataclass(frozen=True)
class PlanIO:
    """A plan's one input and one output as the plan itself declares them."""

    input: str
    output: str
    input_dtype: str
    output_dtype: str
    channels: int
    #: the crop side of the optimisation profile's opt shape
    crop_size: int
    #: the output's last dimension (the embedding width); None where the plan leaves it dynamic
    width: int | None
    #: the batch axis of optimisation profile 0: (min, opt, max)
    batches: tuple[int, int, int]

    def to_dict(self) -> dict:
        return asdict(self)


def plan_io(trt, engine, where: str) -> PlanIO:
    """The input and output tensors of a deserialised ``engine`` (an ``ICudaEngine``), read from the engine."""
    names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
    inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
    outputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
    if len(inputs) != 1 or len(outputs) != 1:
        raise CheckpointError(
            f"{where}: the plan has inputs {inputs} and outputs {outputs}; scdino runs plans with one input (the "
            "crops) and one output (the CLS token): build it with scdino-export tensorrt from an export without "
            "--attention"
        )
    inp, out = inputs[0], outputs[0]
    low, opt, high = (tuple(int(d) for d in dims) for dims in engine.get_tensor_profile_shape(inp, 0))
    if len(opt) != 4:
        raise CheckpointError(
            f"{where}: the plan's input {inp!r} has shape {opt} in its optimisation profile; expected (batch, "
            "channels, height, width): build it with scdino-export tensorrt"
        )
    width = tuple(int(d) for d in engine.get_tensor_shape(out))[-1]
    return PlanIO(
        input=inp,
        output=out,
        input_dtype=numpy_dtype(engine.get_tensor_dtype(inp)),
        output_dtype=numpy_dtype(engine.get_tensor_dtype(out)),
        channels=opt[1],
        crop_size=opt[3],
        width=width if width > 0 else None,
        batches=(low[0], opt[0], high[0]),
    )


def check_plan_io(io: PlanIO, expected: dict, where: str, source: str | None = None) -> None:
    """Refuse a plan whose input/output names, channel count, crop size or output width differ from its sidecar's
    (``expected``: ``input``, ``output``, ``channels``, ``crop_size``, ``width``), naming both."""
    got = {"input": io.input, "output": io.output, "channels": io.channels, "crop_size": io.crop_size}
    got["width"] = io.width if io.width is not None else expected.get("width")
    what = {
        "input": "input name",
        "output": "output name",
        "channels": "channels",
        "crop_size": "crop size (px)",
        "width": "output width",
    }
    diffs = [
        f"{what[k]} {got[k]!r} (sidecar: {expected[k]!r})" for k in what if k in expected and got[k] != expected[k]
    ]
    if diffs:
        raise CheckpointError(
            f"{where}: the plan and its sidecar {sidecar_path(where).name} disagree: {'; '.join(diffs)}. One of them "
            f"was replaced by another model's; build both again: scdino-export tensorrt {source or 'model.onnx'} "
            f"--out {where}"
        )


# ------------------------------------------------------------------------------------------- the plan's precision

#: the keys of an inspector tensor entry that name its type, in the order read: TensorRT 11's separate fields
#: (``Datatype`` in layer tensors, ``DataType`` in ``I/O Tensors``), TensorRT 10's combined ``Format/Datatype``, and
#: 11's ``Format`` (the layout, which names the type too) last
TYPE_KEYS = ("Datatype", "DataType", "Format/Datatype", "Format")

#: words of a type string -> precision; the first that matches wins (whole words: UINT8 is not INT8)
_WORDS = (
    ("int8", {"INT8"}),
    ("fp8", {"FP8", "FLOAT8E4M3", "FLOAT8E5M2", "E4M3", "E5M2"}),
    ("bf16", {"BF16", "BFLOAT16"}),
    ("fp16", {"FP16", "HALF", "FLOAT16"}),
    ("fp32", {"FP32", "FLOAT", "FLOAT32", "KFLOAT"}),
    ("int", {"INT32", "INT64", "UINT8", "BOOL", "INT4"}),
)
#: how low a float precision is (int tensors, indices and shapes, do not count)
_RANK = {"int8": 0, "fp8": 1, "fp16": 2, "bf16": 2, "fp32": 3}
#: data types in a kernel's name (``sm80_xmma_gemm_f16f16_f16f32_f32_...``, ``..._i8f32_i8i32_f32``)
_TACTIC = re.compile(r"bf16|tf32|fp16|fp32|f16|f32|int8|i8|e4m3")
_TACTIC_PRECISION = {
    "bf16": "bf16",
    "tf32": "fp32",
    "fp16": "fp16",
    "fp32": "fp32",
    "f16": "fp16",
    "f32": "fp32",
    "int8": "int8",
    "i8": "int8",
    "e4m3": "fp8",
}
#: layers that compute (their kind, else their name): convolutions, matrix multiplies, attention, fused Myelin regions
_COMPUTES = re.compile(r"conv|gemm|matmul|matrixmultiply|mha|attention|myelin|foreignnode", re.IGNORECASE)
_FUSED = re.compile(r"myelin|foreignnode", re.IGNORECASE)

#: the rule, as recorded in the sidecar
RULE = (
    "layers that compute (convolution, matrix multiply/gemm, attention, fused Myelin/ForeignNode regions) vote with "
    "the lowest precision among their input and output tensors and their kernel's name; a fused region that shows "
    "only fp32 at its boundary does not vote (it hides its inner types); int8 if any vote is int8, else fp16 if fp16 "
    "votes are at least as many as fp32 ones, else fp32; none when nothing voted"
)


def precision_of(text: str) -> str | None:
    """The precision a type string names (``"Half"``, ``"Row major linear FP32 format (kLINEAR)"``, ``"Int32"``):
    int8, fp8, bf16, fp16, fp32, int (an integer tensor), or None (``"N/A due to dynamic shapes"``)."""
    words = set(re.findall(r"[A-Z0-9]+", text.upper()))
    return next((p for p, names in _WORDS if words & names), None)


def tensor_type(tensor: dict) -> tuple[str | None, str | None]:
    """(precision, the key it was read from) of one inspector tensor entry: the first of :data:`TYPE_KEYS` that names
    a type."""
    for key in TYPE_KEYS:
        value = tensor.get(key)
        if isinstance(value, str) and (p := precision_of(value)) is not None:
            return p, key
    return None, None


def _lowest(precisions) -> str | None:
    floats = [p for p in precisions if p in _RANK]
    return min(floats, key=_RANK.__getitem__) if floats else None


def _tensors(layer: dict) -> list[dict]:
    return [t for key in ("Inputs", "Outputs") for t in layer.get(key) or [] if isinstance(t, dict)]


def _tactic_precisions(layer: dict) -> list[str]:
    name = str(layer.get("TacticName") or "").lower()
    return [_TACTIC_PRECISION[w] for w in _TACTIC.findall(name)]


@dataclass
class PrecisionReport:
    """What the inspector says about a built plan's precision, and how it was read."""

    #: the plan's precision by :data:`RULE`; None when nothing voted or the I/O check failed
    precision: str | None
    #: votes of the layers that compute, by precision (``unknown``: a layer whose type could not be told)
    computing: dict[str, int]
    #: every layer by the lowest float type among its tensors (``other``: none)
    layers: dict[str, int]
    #: how many tensor types were read from each key of :data:`TYPE_KEYS`
    keys_read: dict[str, int]
    #: the inspector's JSON schema: ``"TensorRT 11 (Datatype, Format)"``, ``"TensorRT 10 (Format/Datatype)"``, ...
    schema: str
    #: per I/O tensor: the type the engine reports (``get_tensor_dtype``) and the one the inspector wrote
    io: dict[str, dict[str, str | None]]
    #: whether the two agree on every I/O tensor both name (None: nothing to compare)
    io_agree: bool | None

    def to_dict(self) -> dict:
        return {"from": "IEngineInspector.get_engine_information(LayerInformationFormat.JSON)", **asdict(self)}


def _inspector_io(info: dict, layers: list[dict]) -> dict[str, str | None]:
    """The I/O tensors' precisions as the inspector writes them: 11's ``I/O Tensors``, else 10's ``Bindings`` found
    among the layers' tensors."""
    if isinstance(info.get("I/O Tensors"), list):
        return {str(t.get("Name")): tensor_type(t)[0] for t in info["I/O Tensors"] if isinstance(t, dict)}
    found: dict[str, str | None] = {}
    for name in info.get("Bindings") or []:
        for t in (t for layer in layers for t in _tensors(layer)):
            if t.get("Name") == name and (p := tensor_type(t)[0]) is not None:
                found[str(name)] = p
                break
        else:
            found[str(name)] = None
    return found


def read_precision(info: dict, engine_io: dict[str, str]) -> PrecisionReport:
    """The plan's precision from the inspector's JSON ``info`` (``{"Layers": [...], ...}``), cross-checked with the
    engine's own I/O types ``engine_io`` (tensor name -> precision of ``get_tensor_dtype``).

    The rule (:data:`RULE`): only layers that compute vote, so the preprocessing and normalisation pinned to fp32,
    reformats and pointwise kernels do not outvote the matrix multiplies. A computing layer computes in the lowest
    precision among its tensors and its kernel's name: a Q/DQ convolution reads int8 and may write fp16; a fused
    Myelin region of TensorRT 10 that reads fp16 but writes an fp32 output is fp16. A fused region showing only fp32
    at its boundary does not vote: its inner types are not shown. The plan is int8 if any computing layer is int8
    (Q/DQ sits on the matrix multiplies; the rest runs in fp16 around them), else fp16 (or bf16) if those votes are
    at least as many as the fp32 ones, else fp32. None when nothing voted, or when the inspector's I/O types disagree
    with the engine's (then its tensors were misread, and its layers are not trusted).
    """
    layers = [layer for layer in info.get("Layers") or [] if isinstance(layer, dict)]
    computing: dict[str, int] = {}
    every: dict[str, int] = {}
    keys: dict[str, int] = {}
    for layer in layers:
        types = []
        for t in _tensors(layer):
            p, key = tensor_type(t)
            if key:
                keys[key] = keys.get(key, 0) + 1
                types.append(p)
        low = _lowest(types)
        every[low or "other"] = every.get(low or "other", 0) + 1
        kind = str(layer.get("LayerType") or layer.get("Name") or "")
        if not (_COMPUTES.search(kind) or "ForeignNode" in str(layer.get("Name", ""))):
            continue
        vote = _lowest(types + _tactic_precisions(layer))
        if vote == "fp32" and (_FUSED.search(kind) or "ForeignNode" in str(layer.get("Name", ""))):
            vote = None
        computing[vote or "unknown"] = computing.get(vote or "unknown", 0) + 1
    seen = _inspector_io(info, layers)
    io = {
        name: {"engine": engine_io.get(name), "inspector": seen.get(name)}
        for name in dict.fromkeys([*engine_io, *seen])
    }
    compared = [v for v in io.values() if v["engine"] is not None and v["inspector"] is not None]
    agree = all(v["engine"] == v["inspector"] for v in compared) if compared else None
    separate = keys.get("Datatype", 0) + keys.get("DataType", 0)
    schema = (
        "TensorRT 11 (Datatype, Format)"
        if separate and not keys.get("Format/Datatype")
        else "TensorRT 10 (Format/Datatype)"
        if keys.get("Format/Datatype") and not separate
        else "mixed"
        if keys
        else "no tensor types"
    )
    precision = plan_precision(computing) if agree is not False else None
    if agree is False:
        log.warning(
            "TensorRT's engine inspector and the engine disagree on the I/O tensor types (%s); its layer report is not "
            "used for the plan's precision",
            io,
        )
    return PrecisionReport(precision, computing, every, keys, schema, io, agree)


def plan_precision(votes: dict[str, int]) -> str | None:
    """The plan's precision from the computing layers' votes (see :func:`read_precision`)."""
    for low in ("int8", "fp8"):
        if votes.get(low):
            return low
    fp16, bf16, fp32 = votes.get("fp16", 0), votes.get("bf16", 0), votes.get("fp32", 0)
    if not (fp16 or bf16 or fp32):
        return None
    if fp16 + bf16 >= fp32:
        return "bf16" if bf16 > fp16 else "fp16"
    return "fp32"


def inspect_engine(trt, engine) -> PrecisionReport | None:
    """:func:`read_precision` of a deserialised engine (None where this TensorRT gives no inspector report)."""
    names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
    engine_io = {n: precision_of(dtype_name(engine.get_tensor_dtype(n))) for n in names}
    try:
        text = engine.create_engine_inspector().get_engine_information(trt.LayerInformationFormat.JSON)
        info = json.loads(text)
    except (AttributeError, TypeError, ValueError, RuntimeError) as exc:  # no inspector, or not JSON
        log.warning("TensorRT's engine inspector gave nothing (%s); the sidecar records the precision asked for", exc)
        return None
    if not isinstance(info, dict):
        kind = type(info).__name__
        log.warning(
            "TensorRT's engine inspector wrote a JSON %s, not an object; the sidecar records the precision asked for",
            kind,
        )
        return None
    return read_precision(info, engine_io)
