"""TensorRT engines on NVIDIA GPUs: build from an ONNX file, run on torch buffers.

Build: INT8 from the explicit-quantization QDQ ONNX, FP16 from a float ONNX. On TensorRT >= 10 both go through
a strongly typed network (the weakly typed FP16/INT8 builder flags are deprecated since 10.12 and gone in 11):
the Q/DQ nodes fix the INT8 tensors, and the FP16 baseline is the float ONNX converted to FP16 first
(`convert_to_fp16`: float weights and constants to FP16, casts at the graph's input and output). Older TensorRT
builds with the INT8/FP16 flags. One optimization profile over the benchmark's batch sizes; a timing cache on
disk; the serialized plan written atomically beside its build log, its layer information (which layers run in
INT8, read from TensorRT's engine inspector) and its build record (`<plan>.build.json`).

`TensorRTEngine("model.trt.onnx", precision="int8")` builds `model.trt.int8.plan` beside the ONNX file when it
is missing, older than the ONNX file, built for other batch sizes or by another TensorRT, then loads it; a
`.plan`/`.engine` path loads directly.

Run: torch CUDA tensors are the I/O buffers (`execute_async_v3` on tensor addresses, no pycuda); latency is
timed with CUDA events after warm-up, optionally replaying a CUDA graph.

`import tensorrt` happens only inside this module. Without TensorRT or a GPU every entry point raises one
RepqError line saying so; the pure parts (build plan per version, FP16 conversion, profile shapes, plan
freshness, dtype map, the layer-info parser, the report) need neither.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from repq.engines.timing import LatencyStats, cuda_event_times, latency_stats, score, speedup
from repq.errors import RepqError
from repq.reparam.io import atomic_write_bytes, atomic_write_json, atomic_write_text

MIN_VERSION = (8, 6)  # execute_async_v3, tensor addresses and Q/DQ explicit quantization
PRECISIONS = ("int8", "fp16")


# ---------------------------------------------------------------- availability


def _tensorrt():
    try:
        import tensorrt
    except ImportError as err:
        raise RepqError(
            f"TensorRT is not installed ({err}): run in NVIDIA's container (docker/run-ci.sh) "
            "or pip install -e '.[tensorrt]' on a machine with CUDA"
        ) from err
    return tensorrt


def _cuda_device(device: str = "cuda"):
    import torch

    if not torch.cuda.is_available():
        raise RepqError(
            "TensorRT needs an NVIDIA GPU and none is visible to torch: run on a GPU machine "
            "(docker run --gpus all ...) or use the OpenVINO/ONNX Runtime CPU engines"
        )
    return torch.device(device)


def tensorrt_unavailable_reason(path: str | os.PathLike | None = None) -> str | None:
    """None when TensorRT engines can be built and run here, else the one-line reason they cannot (`path`, the
    file to run, makes no difference: the signature of the engine table's checks)."""
    try:
        _tensorrt()
        _cuda_device()
    except RepqError as err:
        return str(err)
    return None


# ---------------------------------------------------------------- build plan per TensorRT version


def parse_version(version: str) -> tuple[int, int]:
    match = re.match(r"^\s*(\d+)\.(\d+)", str(version))
    if not match:
        raise RepqError(f"cannot read TensorRT version {version!r}: expected MAJOR.MINOR[.PATCH]")
    return int(match.group(1)), int(match.group(2))


@dataclass(frozen=True)
class BuildPlan:
    """How to ask a given TensorRT for an engine of a given precision.

    strongly_typed: tensor types come from the graph (Q/DQ for INT8, the ONNX dtypes elsewhere);
    flags: BuilderFlag names to set on a weakly typed network;
    fp16_onnx: the FP32 ONNX must first be converted to FP16 (`convert_to_fp16`; TensorRT >= 10).
    """

    version: tuple[int, int]
    precision: str
    strongly_typed: bool
    flags: tuple[str, ...]
    fp16_onnx: bool
    reason: str


def build_plan(version: str, precision: str) -> BuildPlan:
    """The network typing and builder flags for `precision` on TensorRT `version`."""
    if precision not in PRECISIONS:
        raise RepqError(f"unknown TensorRT precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    ver = parse_version(version)
    if ver < MIN_VERSION:
        raise RepqError(
            f"TensorRT {version} is too old: need >= {MIN_VERSION[0]}.{MIN_VERSION[1]} "
            "(execute_async_v3 and explicit quantization); use a newer NVIDIA container"
        )
    major = ver[0]
    if precision == "int8":
        if major >= 10:
            return BuildPlan(
                ver,
                precision,
                True,
                (),
                False,
                "strongly typed: the Q/DQ nodes fix every INT8 tensor, the rest keeps its ONNX type",
            )
        return BuildPlan(
            ver,
            precision,
            False,
            ("INT8", "FP16"),
            False,
            "no strong typing before 10.x: INT8 for the Q/DQ layers, FP16 allowed elsewhere",
        )
    if major >= 10:
        return BuildPlan(
            ver,
            precision,
            True,
            (),
            True,
            "strongly typed: the FP32 ONNX is converted to FP16 first (the FP16 builder flag is deprecated "
            "since TensorRT 10.12 and removed in 11)",
        )
    return BuildPlan(
        ver,
        precision,
        False,
        ("FP16",),
        False,
        "no strong typing before 10.x: FP16 flag on the FP32 graph (TensorRT picks FP16 kernels where faster)",
    )


# ---------------------------------------------------------------- optimization profile


@dataclass(frozen=True)
class ProfileShapes:
    min: tuple[int, ...]
    opt: tuple[int, ...]
    max: tuple[int, ...]


def profile_shapes(
    onnx_input_shape: Sequence, batch_sizes: Sequence[int], opt_batch: int | None = None
) -> ProfileShapes:
    """min/opt/max input shapes for one optimization profile that covers every batch size asked for.

    onnx_input_shape is the ONNX input's dims: the batch dim may be symbolic (a str or None); the others
    must be fixed numbers. opt defaults to the largest batch (where throughput matters most).
    """
    dims = list(onnx_input_shape)
    if len(dims) < 2:
        raise RepqError(f"input shape {dims} has no batch dimension: export with NCHW input")
    rest = dims[1:]
    if any(not isinstance(d, int) or d <= 0 for d in rest):
        raise RepqError(f"input shape {dims} has dynamic non-batch dims: export with a fixed image size")
    batches = sorted({int(b) for b in batch_sizes})
    if not batches or batches[0] < 1:
        raise RepqError(f"batch sizes {list(batch_sizes)} must be positive integers: e.g. --batch 1 8 32")
    fixed = dims[0] if isinstance(dims[0], int) and dims[0] > 0 else None
    if fixed is not None and batches != [fixed]:
        raise RepqError(
            f"the ONNX input has a fixed batch of {fixed} but batches {batches} were asked: "
            "export with a dynamic batch dimension"
        )
    opt = batches[-1] if opt_batch is None else int(opt_batch)
    if not batches[0] <= opt <= batches[-1]:
        raise RepqError(f"opt batch {opt} lies outside [{batches[0]}, {batches[-1]}]: pick one of {batches}")
    return ProfileShapes((batches[0], *rest), (opt, *rest), (batches[-1], *rest))


def onnx_input(onnx_path: str | os.PathLike) -> tuple[str, list]:
    """Name and dims (ints, or the symbolic name for dynamic ones) of the single graph input."""
    import onnx

    path = Path(onnx_path)
    if not path.is_file():
        raise RepqError(f"ONNX file {path} does not exist: export the model first (engines.export)")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as err:
        raise RepqError(f"{path} is not a readable ONNX file ({type(err).__name__}): re-export it") from err
    initializers = {init.name for init in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in initializers]
    if len(inputs) != 1:
        raise RepqError(f"{path} has {len(inputs)} inputs; the TensorRT engine runs one-input classifiers")
    dims = [
        d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in inputs[0].type.tensor_type.shape.dim
    ]
    return inputs[0].name, dims


# ---------------------------------------------------------------- engine information (which layers run INT8)

_COMPUTE_TYPES = ("Convolution", "Deconvolution", "Gemm", "MatrixMultiply", "FullyConnected", "MatMul")
_ONNX_NAME = re.compile(r"\[ONNX Layer: ([^\]]+)\]")


def _datatype(text: str) -> str:
    """fp32/fp16/bf16/int8/fp8/... from a TensorRT "Format/Datatype" or weights "Type" string."""
    t = str(text).lower()
    for token, name in (
        ("int8", "int8"),
        ("fp8", "fp8"),
        ("bf16", "bf16"),
        ("fp16", "fp16"),
        ("half", "fp16"),
        ("fp32", "fp32"),
        ("float", "fp32"),
        ("int32", "int32"),
        ("int64", "int64"),
        ("bool", "bool"),
    ):
        if token in t:
            return name
    return "unknown"


# TensorRT 10 writes one "Format/Datatype" string per tensor; TensorRT 11 splits it into "DataType" and "Format".
_TYPE_KEYS = ("DataType", "Datatype", "Format/Datatype", "Format/DataType", "Format")


def _tensor_type(tensor: dict) -> str:
    for key in _TYPE_KEYS:
        if key in tensor:
            kind = _datatype(tensor[key])
            if kind != "unknown":
                return kind
    return "unknown"


@dataclass(frozen=True)
class EngineLayer:
    name: str
    layer_type: str
    input_type: str
    weight_type: str | None
    output_type: str
    tactic: str
    onnx_layers: tuple[str, ...]

    @property
    def is_compute(self) -> bool:
        return any(kind in self.layer_type for kind in _COMPUTE_TYPES)

    @property
    def precision(self) -> str:
        """INT8 only when both the activation read and the weights are INT8 (an INT8 input with float weights
        is a float kernel behind a reformat)."""
        if self.weight_type is not None:
            return "int8" if self.weight_type == "int8" and self.input_type == "int8" else self.weight_type
        return self.input_type


def parse_engine_info(info: str | dict) -> list[EngineLayer]:
    """Layers of `IEngineInspector.get_engine_information(LayerInformationFormat.JSON)` output.

    Needs an engine built with ProfilingVerbosity.DETAILED: without it TensorRT lists bare layer names.
    """
    data = json.loads(info) if isinstance(info, str) else info
    layers = data.get("Layers") if isinstance(data, dict) else None
    if not isinstance(layers, list):
        raise RepqError("engine information has no 'Layers' list: pass the inspector's JSON output")
    parsed = []
    for entry in layers:
        if not isinstance(entry, dict):
            raise RepqError(
                "engine information lists bare layer names: rebuild the engine with "
                "profiling_verbosity = ProfilingVerbosity.DETAILED"
            )
        inputs, outputs = entry.get("Inputs") or [], entry.get("Outputs") or []
        weights = entry.get("Weights")
        layer_type = str(entry.get("LayerType", ""))
        parameter_type = str(entry.get("ParameterType", ""))
        parsed.append(
            EngineLayer(
                name=str(entry.get("Name", "")),
                layer_type=f"{layer_type}/{parameter_type}" if parameter_type else layer_type,
                input_type=_tensor_type(inputs[0]) if inputs else "unknown",
                weight_type=_datatype(weights.get("Type", "")) if isinstance(weights, dict) and weights else None,
                output_type=_tensor_type(outputs[0]) if outputs else "unknown",
                tactic=str(entry.get("TacticName", "")),
                onnx_layers=tuple(_ONNX_NAME.findall(str(entry.get("Metadata", "")))),
            )
        )
    return parsed


def int8_coverage(layers: Sequence[EngineLayer]) -> dict:
    """Compute layers (conv, gemm, matmul) that run in INT8, and the ones that fell back, by name and type."""
    compute = [layer for layer in layers if layer.is_compute]
    int8 = [layer for layer in compute if layer.precision == "int8"]
    return {
        "compute_layers": len(compute),
        "int8_layers": len(int8),
        "int8_fraction": len(int8) / len(compute) if compute else 0.0,
        "fallback": [
            {"name": layer.name, "precision": layer.precision, "onnx_layers": list(layer.onnx_layers)}
            for layer in compute
            if layer.precision != "int8"
        ],
    }


# ---------------------------------------------------------------- FP16 ONNX (the strongly typed FP16 baseline)

# Inputs the ONNX spec types float32 whatever the data's type (Resize's roi and scales, Upsample's scales).
_FLOAT32_INPUTS = {"Resize": (1, 2), "Upsample": (1,)}
_FP16_MAX = float(np.finfo(np.float16).max)


def _half(array: np.ndarray) -> np.ndarray:
    """float32 -> float16, values beyond FP16's range clipped to its largest finite value instead of inf."""
    return np.clip(array, -_FP16_MAX, _FP16_MAX).astype(np.float16)


def convert_to_fp16(model):
    """An FP16 copy of a float ONNX model whose graph inputs and outputs stay float32.

    Float32 initializers and Constant/ConstantOfShape values become float16, Casts to float32 cast to float16,
    a Cast to float16 follows each float32 graph input and a Cast back to float32 precedes each float32 graph
    output; intermediate value_info types follow. Tensors the ONNX spec types float32 (Resize's roi and
    scales) are left alone. The result passes onnx's checker with strict type inference. A QDQ (INT8) model
    is refused: its scales' type would change with it, and TensorRT builds INT8 from the QDQ file itself.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from repq.engines.engine import QDQ_OPS

    graph = model.graph
    if any(node.op_type in QDQ_OPS for node in graph.node):
        raise RepqError("the ONNX file has Q/DQ nodes (an INT8 file): convert the float (FP32) file to FP16, "
                        "and build INT8 engines from the QDQ file itself")
    if any(attr.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
           for node in graph.node for attr in node.attribute):
        raise RepqError("FP16 conversion handles graphs without control flow (If/Loop/Scan): export the model "
                        "without data-dependent branches")
    converted = onnx.ModelProto()
    converted.CopyFrom(model)
    graph = converted.graph
    float32, float16 = TensorProto.FLOAT, TensorProto.FLOAT16
    keep = {node.input[i] for node in graph.node for i in _FLOAT32_INPUTS.get(node.op_type, ())
            if i < len(node.input) and node.input[i]}

    for index, init in enumerate(graph.initializer):
        if init.data_type == float32 and init.name not in keep:
            graph.initializer[index].CopyFrom(numpy_helper.from_array(_half(numpy_helper.to_array(init)), init.name))
    for node in graph.node:
        if any(out in keep for out in node.output):
            continue
        if node.op_type in ("Constant", "ConstantOfShape"):
            for attr in node.attribute:
                if attr.name == "value" and attr.t.data_type == float32:
                    attr.t.CopyFrom(numpy_helper.from_array(_half(numpy_helper.to_array(attr.t)), attr.t.name))
                elif attr.name in ("value_float", "value_floats"):
                    values = np.asarray(attr.f if attr.name == "value_float" else list(attr.floats), np.float32)
                    tensor = numpy_helper.from_array(_half(values))
                    del node.attribute[:]
                    node.attribute.append(helper.make_attribute("value", tensor))
                    break
        elif node.op_type == "Cast":
            for attr in node.attribute:
                if attr.name == "to" and attr.i == float32:
                    attr.i = float16
    for info in graph.value_info:
        if info.type.tensor_type.elem_type == float32 and info.name not in keep:
            info.type.tensor_type.elem_type = float16

    initializers = {init.name: init.data_type for init in graph.initializer}
    first, last = [], []
    for graph_input in graph.input:
        if graph_input.name in initializers:  # an initializer listed as an input (older exporters): its new type
            graph_input.type.tensor_type.elem_type = initializers[graph_input.name]
            continue
        if graph_input.type.tensor_type.elem_type != float32:
            continue
        half = f"{graph_input.name}__fp16"
        for node in graph.node:
            node.input[:] = [half if name == graph_input.name else name for name in node.input]
        first.append(helper.make_node("Cast", [graph_input.name], [half], to=float16,
                                      name=f"{graph_input.name}__cast_to_fp16"))
    inputs = {i.name for i in graph.input}
    for graph_output in graph.output:
        if graph_output.type.tensor_type.elem_type != float32 or graph_output.name in inputs:
            continue
        half = f"{graph_output.name}__fp16"
        for node in graph.node:
            node.output[:] = [half if name == graph_output.name else name for name in node.output]
            node.input[:] = [half if name == graph_output.name else name for name in node.input]
        last.append(helper.make_node("Cast", [half], [graph_output.name], to=float32,
                                     name=f"{graph_output.name}__cast_to_fp32"))
    nodes = [*first, *graph.node, *last]
    del graph.node[:]
    graph.node.extend(nodes)
    try:
        onnx.checker.check_model(converted, full_check=True)
    except Exception as err:  # onnx's checker and shape-inference errors
        first_line = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
        raise RepqError(f"the FP16 conversion does not type-check ({first_line}): build this model with "
                        "TensorRT's FP16 builder flag on TensorRT < 10, or convert it with ModelOpt AutoCast"
                        ) from err
    return converted


def write_fp16_onnx(onnx_path: str | os.PathLike, out_path: str | os.PathLike) -> Path:
    """`convert_to_fp16` of one ONNX file, written atomically to `out_path`."""
    import onnx

    path = Path(onnx_path)
    try:
        model = onnx.load(str(path))
    except Exception as err:  # onnx raises DecodeError and others for a truncated file
        raise RepqError(f"{path} is not a readable ONNX file ({type(err).__name__}): re-export it") from err
    return atomic_write_bytes(Path(out_path), convert_to_fp16(model).SerializeToString())


# ---------------------------------------------------------------- I/O dtypes

# TensorRT DataType member -> torch dtype name, for every type an engine's input or output can have.
TRT_TORCH_DTYPES = {
    "FLOAT": "float32",
    "HALF": "float16",
    "BF16": "bfloat16",
    "INT8": "int8",
    "UINT8": "uint8",
    "INT32": "int32",
    "INT64": "int64",
    "BOOL": "bool",
}


def torch_dtypes(trt) -> dict:
    """{trt.DataType: torch.dtype} for the members this TensorRT has (BF16 and INT64 came with 9.x/10.x)."""
    import torch

    return {getattr(trt.DataType, member): getattr(torch, name)
            for member, name in TRT_TORCH_DTYPES.items() if hasattr(trt.DataType, member)}


# ---------------------------------------------------------------- plan files beside the ONNX file

PLAN_SUFFIXES = (".plan", ".engine")


def resolve_precision(onnx_path: str | os.PathLike, precision: str | None) -> str:
    """The precision to build `onnx_path` in: int8 for a QDQ file, fp16 for a float file when None; a
    precision that does not fit the file is refused (a float file has no INT8 scales, a QDQ file is INT8)."""
    from repq.engines.engine import onnx_is_quantized

    quantized = onnx_is_quantized(onnx_path)
    if precision is None:
        return "int8" if quantized else "fp16"
    if precision not in PRECISIONS:
        raise RepqError(f"unknown TensorRT precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    if precision == "int8" and not quantized:
        raise RepqError(f"{Path(onnx_path).name} has no Q/DQ nodes, so TensorRT has no INT8 scales for it: "
                        "build the QDQ file (.trt.onnx) for int8, or this one with precision fp16")
    if precision == "fp16" and quantized:
        raise RepqError(f"{Path(onnx_path).name} is a QDQ (INT8) file: build it with precision int8, or the "
                        "float (_fp32.onnx) file with precision fp16")
    return precision


def plan_path(onnx_path: str | os.PathLike, precision: str, plan_dir: str | os.PathLike | None = None) -> Path:
    """Where the plan of `onnx_path` in `precision` lives: model.trt.onnx -> model.trt.int8.plan, beside the ONNX
    file unless `plan_dir` is given."""
    path = Path(onnx_path)
    stem = path.name[: -len(".onnx")] if path.name.lower().endswith(".onnx") else path.name
    return Path(plan_dir or path.parent) / f"{stem}.{precision}.plan"


def _sidecar(plan: Path, kind: str) -> Path:
    return plan.with_name(f"{plan.name}.{kind}")


def read_build_record(plan: str | os.PathLike) -> dict | None:
    """The build record written beside a plan (`<plan>.build.json`), or None."""
    record = _sidecar(Path(plan), "build.json")
    try:
        value = json.loads(record.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def plan_rebuild_reason(onnx_path: str | os.PathLike, plan: str | os.PathLike, batch_sizes: Sequence[int],
                        trt_version: str) -> str | None:
    """None when `plan` can be loaded as the engine of `onnx_path`, else why it must be built (again)."""
    onnx_path, plan = Path(onnx_path), Path(plan)
    if not plan.is_file():
        return "no plan yet"
    if plan.stat().st_mtime < onnx_path.stat().st_mtime:
        return f"{onnx_path.name} is newer than the plan"
    record = read_build_record(plan)
    if record is None:
        return "the plan has no build record"
    if str(record.get("trt_version")) != str(trt_version):
        return f"built by TensorRT {record.get('trt_version')}, this is {trt_version}"
    profile = record.get("profile") or {}
    low, high = (profile.get("min") or [0])[0], (profile.get("max") or [0])[0]
    if not batch_sizes or not low <= min(batch_sizes) <= max(batch_sizes) <= high:
        return f"built for batches {low}..{high}, not {sorted(set(batch_sizes))}"
    return None


def source_onnx(plan: str | os.PathLike) -> Path | None:
    """The ONNX file a plan was built from: its build record's, else the file its name says
    (model.trt.int8.plan -> model.trt.onnx; model.engine -> model.onnx or model.trt.onnx)."""
    plan = Path(plan)
    record = read_build_record(plan) or {}
    candidates = [Path(record["onnx"])] if record.get("onnx") else []
    match = re.match(r"^(.*)\.(?:int8|fp16)\.(?:plan|engine)$", plan.name)
    if match:
        candidates.append(plan.with_name(match.group(1) + ".onnx"))
    candidates += [plan.with_suffix(".onnx"), plan.with_suffix(".trt.onnx")]
    return next((p for p in candidates if p.is_file()), None)


# ---------------------------------------------------------------- build


@dataclass
class BuildResult:
    engine_path: Path
    log_path: Path
    layers_path: Path
    plan: BuildPlan
    profile: ProfileShapes
    coverage: dict
    build_seconds: float
    trt_version: str
    extra: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self).items()}


def build_engine(
    onnx_path: str | os.PathLike,
    engine_path: str | os.PathLike,
    *,
    precision: str = "int8",
    batch_sizes: Sequence[int] = (1, 8, 32),
    opt_batch: int | None = None,
    timing_cache: str | os.PathLike | None = None,
    workspace_gb: float = 4.0,
) -> BuildResult:
    """Build and serialize one engine; write `<engine>.log`, `<engine>.layers.json` (TensorRT's per-layer
    information: which layers run in INT8) and `<engine>.build.json` (this result) beside it."""
    trt = _tensorrt()
    _cuda_device()
    source, engine_path = Path(onnx_path), Path(engine_path)
    input_name, dims = onnx_input(source)
    profile = profile_shapes(dims, batch_sizes, opt_batch)
    precision = resolve_precision(source, precision)
    plan = build_plan(trt.__version__, precision)
    onnx_path = source
    if plan.fp16_onnx:  # model_fp32.fp16.plan is built from model_fp32.fp16.onnx, written beside it
        converted = engine_path.with_name(f"{engine_path.stem}.onnx")
        if converted.resolve() == source.resolve():
            converted = engine_path.with_name(f"{engine_path.stem}.converted.onnx")
        onnx_path = write_fp16_onnx(source, converted)

    log_lines: list[str] = []

    class _Logger(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)

        def log(self, severity, msg):
            log_lines.append(f"[{str(severity).rsplit('.', 1)[-1]}] {msg}")

    logger = _Logger()
    builder = trt.Builder(logger)
    flags = 0
    if plan.version[0] < 10:
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    if plan.strongly_typed and plan.version[0] < 11:  # 11.x: always strongly typed, the flag is ignored
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i).desc()) for i in range(parser.num_errors))
        raise RepqError(f"TensorRT cannot parse {onnx_path}: {errors[:300]} (check the opset and Q/DQ placement)")

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
    for flag in plan.flags:
        config.set_flag(getattr(trt.BuilderFlag, flag))
    optimization_profile = builder.create_optimization_profile()
    optimization_profile.set_shape(input_name, profile.min, profile.opt, profile.max)
    config.add_optimization_profile(optimization_profile)

    cache_path = Path(timing_cache) if timing_cache else engine_path.parent / "timing.cache"
    cache = config.create_timing_cache(cache_path.read_bytes() if cache_path.is_file() else b"")
    if not config.set_timing_cache(cache, ignore_mismatch=False):  # a cache from another GPU or version
        log_lines.append(f"[repq] timing cache {cache_path} does not match this GPU/TensorRT: starts anew")
        config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=False)

    start = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    seconds = time.perf_counter() - start
    log_path = _sidecar(engine_path, "log")
    atomic_write_text(log_path, "\n".join(log_lines) + "\n")
    if serialized is None:
        raise RepqError(f"TensorRT could not build the {precision} engine for {onnx_path}: see {log_path}")
    atomic_write_bytes(cache_path, bytes(config.get_timing_cache().serialize()))

    runtime = trt.Runtime(logger)
    engine = runtime.deserialize_cuda_engine(bytes(serialized))
    info = engine.create_engine_inspector().get_engine_information(trt.LayerInformationFormat.JSON)
    layers_path = _sidecar(engine_path, "layers.json")
    atomic_write_text(layers_path, info)
    coverage = int8_coverage(parse_engine_info(info))
    result = BuildResult(engine_path, log_path, layers_path, plan, profile, coverage, seconds, trt.__version__,
                         {"onnx": str(source), "built_from": str(onnx_path), "batch_sizes": sorted(batch_sizes),
                          "workspace_gb": workspace_gb})
    # The plan last: a plan on disk always has its record, so a killed build is redone, never half-trusted.
    atomic_write_json(_sidecar(engine_path, "build.json"), result.as_dict() | {"onnx": str(source)})
    atomic_write_bytes(engine_path, bytes(serialized))
    return result


# ---------------------------------------------------------------- run


class TensorRTEngine:
    """A TensorRT engine with one input and one output, run on torch CUDA tensors.

    `path` is a plan (.plan/.engine), loaded as it is, or an ONNX file: its plan (`plan_path`: beside it, or in
    `plan_dir`) is built first when `plan_rebuild_reason` finds one. precision None: int8 for a QDQ file, fp16
    for a float one. batch_sizes: the optimization profile's range (min..max; a larger batch is run in chunks).
    cuda_graph: whether `benchmark` replays the launch as a CUDA graph.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        precision: str | None = None,
        batch_sizes: Sequence[int] = (1, 8, 32),
        workspace_gb: float = 4.0,
        cuda_graph: bool = True,
        plan_dir: str | os.PathLike | None = None,
        device: str = "cuda",
    ):
        trt = _tensorrt()
        self.device = _cuda_device(device)
        import torch

        path = Path(path)
        if not path.is_file():
            raise RepqError(f"{path} does not exist: pass a .plan/.engine file or the ONNX file to build it from")
        self.build: dict | None = None
        if path.suffix.lower() == ".onnx":
            self.onnx_path = path
            self.precision = resolve_precision(path, precision)
            plan = plan_path(path, self.precision, plan_dir)
            if plan_rebuild_reason(path, plan, batch_sizes, trt.__version__):
                plan.parent.mkdir(parents=True, exist_ok=True)
                self.build = build_engine(path, plan, precision=self.precision, batch_sizes=batch_sizes,
                                          workspace_gb=workspace_gb).as_dict()
        else:
            plan, self.onnx_path = path, source_onnx(path)
            record = read_build_record(plan) or {}
            self.precision = record.get("plan", {}).get("precision", precision)
        self.plan_path = plan
        self.cuda_graph = bool(cuda_graph)
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self.engine = self._runtime.deserialize_cuda_engine(plan.read_bytes())
        if self.engine is None:
            raise RepqError(f"{plan} is not an engine for this TensorRT {trt.__version__} and GPU: rebuild it here")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if n not in inputs]
        if len(inputs) != 1 or len(outputs) != 1:
            raise RepqError(f"{plan} has {len(inputs)} inputs and {len(outputs)} outputs: expected one of each")
        self.input_name, self.output_name = inputs[0], outputs[0]
        dtypes = torch_dtypes(trt)
        for name in (self.input_name, self.output_name):
            if self.engine.get_tensor_dtype(name) not in dtypes:
                raise RepqError(f"{plan}: tensor {name} has type {self.engine.get_tensor_dtype(name)}, which "
                                f"repq does not feed (it runs {', '.join(TRT_TORCH_DTYPES.values())})")
        self.input_dtype = dtypes[self.engine.get_tensor_dtype(self.input_name)]
        self.output_dtype = dtypes[self.engine.get_tensor_dtype(self.output_name)]
        lo, _, hi = self.engine.get_tensor_profile_shape(self.input_name, 0)
        self.batch_range = (int(lo[0]), int(hi[0]))
        self.image_shape = tuple(int(d) for d in hi[1:])
        self.input_shape = (-1, *self.image_shape)
        self.trt_version = trt.__version__
        self.stream = torch.cuda.Stream(device=self.device)

    def _bind(self, images):
        """Set the input shape and both tensor addresses; return the output buffer."""
        import torch

        batch = images.shape[0]
        if not self.batch_range[0] <= batch <= self.batch_range[1]:
            raise RepqError(
                f"batch {batch} is outside the engine's profile {self.batch_range}: "
                "rebuild with that batch in batch_sizes"
            )
        self.context.set_input_shape(self.input_name, tuple(images.shape))
        output = torch.empty(
            tuple(self.context.get_tensor_shape(self.output_name)),
            dtype=self.output_dtype,
            device=self.device,
        )
        self.context.set_tensor_address(self.input_name, images.data_ptr())
        self.context.set_tensor_address(self.output_name, output.data_ptr())
        return output

    def _launch(self) -> None:
        if not self.context.execute_async_v3(self.stream.cuda_stream):
            raise RepqError("TensorRT execute_async_v3 failed: see the TensorRT log above")

    def infer(self, images):
        """torch tensor (any device) of a batch inside the profile -> output tensor on the GPU."""
        import torch

        images = images.to(self.device, self.input_dtype).contiguous()
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        output = self._bind(images)
        self._launch()
        self.stream.synchronize()
        return output

    def __call__(self, images: np.ndarray) -> np.ndarray:
        """Any number of images: run in chunks of the profile's largest batch, a short last one padded up to
        its smallest."""
        import torch

        images = np.ascontiguousarray(images, dtype=np.float32)
        low, high = self.batch_range
        outputs = []
        for start in range(0, len(images), high):
            chunk = images[start:start + high]
            pad = max(0, low - len(chunk))
            if pad:
                chunk = np.concatenate([chunk, np.zeros((pad, *chunk.shape[1:]), np.float32)])
            out = self.infer(torch.from_numpy(chunk)).float().cpu().numpy()
            outputs.append(out[: len(out) - pad])
        return np.concatenate(outputs)

    def evaluate(self, loader) -> dict:
        return score(self, loader)

    def times(self, image_shape: Sequence[int], batch: int, *, warmup: int = 20, runs: int = 100,
              cuda_graph: bool | None = None) -> list[float]:
        """GPU seconds per run of one batch of random images of (C, H, W) (CUDA events; optionally a CUDA graph)."""
        import torch

        if tuple(image_shape) != self.image_shape:
            raise RepqError(f"{self.plan_path} runs images of {self.image_shape}, not {tuple(image_shape)}: "
                            "time it at its own size, or rebuild it from an ONNX file of that size")
        cuda_graph = self.cuda_graph if cuda_graph is None else cuda_graph
        images = torch.randn((batch, *self.image_shape), device=self.device).to(self.input_dtype)
        output = self._bind(images)  # both buffers must stay alive while the batch is timed
        self._launch()
        self.stream.synchronize()
        launch = self._launch
        if cuda_graph:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, stream=self.stream):
                self._launch()
            launch = graph.replay
        times = cuda_event_times(launch, self.stream, warmup=warmup, runs=runs)
        del images, output
        return times

    def benchmark(
        self,
        image_shape: Sequence[int],
        batch_sizes: Sequence[int] = (1, 8),
        *,
        warmup: int = 20,
        runs: int = 100,
        cuda_graph: bool | None = None,
    ) -> list[LatencyStats]:
        """Latency per batch size on random images of (C, H, W), which must be the engine's own image shape."""
        return [latency_stats(self.times(image_shape, b, warmup=warmup, runs=runs, cuda_graph=cuda_graph), b)
                for b in batch_sizes]

    def int8_coverage(self) -> dict | None:
        """Compute layers that run in INT8, from the layer information written beside the plan (None without)."""
        layers = _sidecar(self.plan_path, "layers.json")
        return int8_coverage(parse_engine_info(layers.read_text(encoding="utf-8"))) if layers.is_file() else None

    def describe(self) -> dict:
        return {"engine": "tensorrt", "plan": str(self.plan_path),
                "onnx": str(self.onnx_path) if self.onnx_path else None, "precision": self.precision,
                "batch_range": list(self.batch_range), "input_shape": list(self.input_shape),
                "input_dtype": str(self.input_dtype).removeprefix("torch."), "cuda_graph": self.cuda_graph,
                "version": self.trt_version, "built_now": self.build is not None, "int8": self.int8_coverage()}


# ---------------------------------------------------------------- whole measurement + report


def measure(
    int8_onnx: str | os.PathLike,
    fp32_onnx: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    batch_sizes: Sequence[int] = (1, 8, 32),
    loader=None,
    warmup: int = 20,
    runs: int = 100,
    cuda_graph: bool = True,
) -> dict:
    """Build the INT8 engine from the QDQ file and the FP16 reference from the FP32 file (plans in `out_dir`, or
    loaded from there when fresh); time, score both; write tensorrt.json and tensorrt.md."""
    out = Path(out_dir)
    result: dict = {"batch_sizes": list(batch_sizes), "cuda_graph": cuda_graph}
    for precision, onnx_path in (("int8", int8_onnx), ("fp16", fp32_onnx)):
        engine = TensorRTEngine(onnx_path, precision=precision, batch_sizes=batch_sizes, cuda_graph=cuda_graph,
                                plan_dir=out)
        stats = engine.benchmark(engine.image_shape, batch_sizes, warmup=warmup, runs=runs)
        result[precision] = {
            "build": engine.build or read_build_record(engine.plan_path),
            "latency": [s.as_dict() for s in stats],
            "accuracy": engine.evaluate(loader) if loader is not None else None,
        }
    result["speedup_int8_over_fp16"] = {
        str(a["batch_size"]): speedup(LatencyStats(**b), LatencyStats(**a))
        for a, b in zip(result["int8"]["latency"], result["fp16"]["latency"], strict=True)
    }
    atomic_write_json(out / "tensorrt.json", result)
    atomic_write_text(out / "tensorrt.md", report_section(result))
    return result


def report_section(result: dict) -> str:
    """Markdown: INT8 layer coverage with the fallback layers named, latency table and INT8/FP16 speed-up."""
    int8, fp16 = result["int8"], result["fp16"]
    coverage = int8["build"]["coverage"]
    lines = [
        "## TensorRT",
        "",
        f"TensorRT {int8['build']['trt_version']}; INT8 engine: {int8['build']['plan']['reason']}.",
        "",
        f"INT8 layer coverage: {coverage['int8_layers']} of {coverage['compute_layers']} compute layers "
        f"({100 * coverage['int8_fraction']:.1f}%).",
    ]
    if coverage["fallback"]:
        lines += ["", "Layers that did not run in INT8:", ""]
        lines += [f"- `{f['name']}` ({f['precision']})" for f in coverage["fallback"]]
    lines += [
        "",
        "| batch | FP16 median ms | INT8 median ms | INT8 p90 ms | INT8 p99 ms | INT8 FPS | INT8/FP16 |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for a, b in zip(int8["latency"], fp16["latency"], strict=True):
        ratio = result["speedup_int8_over_fp16"][str(a["batch_size"])]
        lines.append(
            f"| {a['batch_size']} | {b['median_ms']:.3f} | {a['median_ms']:.3f} | {a['p90_ms']:.3f} | "
            f"{a['p99_ms']:.3f} | {a['fps']:.0f} | {ratio:.2f}x |"
        )
    for name, part in (("INT8", int8), ("FP16", fp16)):
        if part.get("accuracy"):
            acc = part["accuracy"]
            lines.append(
                f"\n{name} engine accuracy: top-1 {acc['top1']:.2f}%, top-5 {acc['top5']:.2f}% "
                f"on {acc['images']} images."
            )
    return "\n".join(lines) + "\n"
