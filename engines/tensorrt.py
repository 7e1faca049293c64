"""TensorRT engines on NVIDIA GPUs: build from the explicit-quantization QDQ ONNX, run on torch buffers.

Build: a strongly typed network where the installed TensorRT has one (10.x; 11.x removed the INT8/FP16
builder flags and calibrators), else the INT8 and FP16 flags; one optimization profile over the benchmark's
batch sizes; a timing cache on disk; the serialized engine written atomically beside its build log and its
layer information (which layers run in INT8, read from TensorRT's engine inspector).

Run: torch CUDA tensors are the I/O buffers (`execute_async_v3` on tensor addresses, no pycuda); latency is
timed with CUDA events after warm-up, optionally replaying a CUDA graph.

`import tensorrt` happens only inside this module. Without TensorRT or a GPU every entry point raises one
RepqError line saying so; the pure parts (build plan per version, profile shapes, the layer-info parser, the
report) need neither.
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


def tensorrt_unavailable_reason() -> str | None:
    """None when TensorRT engines can be built and run here, else the one-line reason they cannot."""
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
    fp16_onnx: the FP32 ONNX must first be converted to FP16 (TensorRT 11 has no FP16 flag).
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
    if major >= 11:
        return BuildPlan(
            ver,
            precision,
            True,
            (),
            True,
            "TensorRT 11 removed the FP16 flag: the ONNX is converted to FP16 and built strongly typed",
        )
    return BuildPlan(
        ver,
        precision,
        False,
        ("FP16",),
        False,
        "FP16 flag on the FP32 graph (TensorRT picks FP16 kernels where they are faster)",
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


def _fp16_onnx(onnx_path: Path, out_dir: Path) -> Path:
    """FP16 copy of an FP32 ONNX for a strongly typed build (ModelOpt AutoCast, I/O kept FP32)."""
    try:
        from modelopt.onnx.autocast import convert_to_mixed_precision
    except ImportError as err:
        raise RepqError(
            f"FP16 conversion for TensorRT 11 needs ModelOpt's ONNX extra ({err}): pip install 'nvidia-modelopt[onnx]'"
        ) from err
    import onnx

    converted = convert_to_mixed_precision(onnx_path=str(onnx_path), low_precision_type="fp16", keep_io_types=True)
    out = out_dir / (onnx_path.stem + ".fp16.onnx")
    atomic_write_bytes(out, converted.SerializeToString())
    onnx.checker.check_model(str(out))
    return out


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
    """Build and serialize one engine; write `<engine>.log` and `<engine>.layers.json` beside it."""
    trt = _tensorrt()
    _cuda_device()
    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    input_name, dims = onnx_input(onnx_path)
    profile = profile_shapes(dims, batch_sizes, opt_batch)
    plan = build_plan(trt.__version__, precision)
    if plan.fp16_onnx:
        onnx_path = _fp16_onnx(onnx_path, engine_path.parent)

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
    if plan.strongly_typed and plan.version[0] < 11:
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
    log_path = engine_path.with_suffix(engine_path.suffix + ".log")
    atomic_write_text(log_path, "\n".join(log_lines) + "\n")
    if serialized is None:
        raise RepqError(f"TensorRT could not build the {precision} engine for {onnx_path}: see {log_path}")
    atomic_write_bytes(cache_path, bytes(config.get_timing_cache().serialize()))
    atomic_write_bytes(engine_path, bytes(serialized))

    runtime = trt.Runtime(logger)
    engine = runtime.deserialize_cuda_engine(bytes(serialized))
    info = engine.create_engine_inspector().get_engine_information(trt.LayerInformationFormat.JSON)
    layers_path = engine_path.with_suffix(engine_path.suffix + ".layers.json")
    atomic_write_text(layers_path, info)
    coverage = int8_coverage(parse_engine_info(info))
    return BuildResult(engine_path, log_path, layers_path, plan, profile, coverage, seconds, trt.__version__)


# ---------------------------------------------------------------- run


class TensorRTEngine:
    """A deserialized engine with one input and one output, run on torch CUDA tensors."""

    def __init__(self, engine_path: str | os.PathLike, device: str = "cuda"):
        trt = _tensorrt()
        self.device = _cuda_device(device)
        import torch

        path = Path(engine_path)
        if not path.is_file():
            raise RepqError(f"TensorRT engine {path} does not exist: build it first (engines.tensorrt.build_engine)")
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self.engine = self._runtime.deserialize_cuda_engine(path.read_bytes())
        if self.engine is None:
            raise RepqError(f"{path} is not an engine for this TensorRT {trt.__version__} and GPU: rebuild it here")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if n not in inputs]
        if len(inputs) != 1 or len(outputs) != 1:
            raise RepqError(f"{path} has {len(inputs)} inputs and {len(outputs)} outputs: expected one of each")
        self.input_name, self.output_name = inputs[0], outputs[0]
        dtypes = {
            trt.float32: torch.float32,
            trt.float16: torch.float16,
            trt.int8: torch.int8,
            trt.int32: torch.int32,
        }
        self.input_dtype = dtypes[self.engine.get_tensor_dtype(self.input_name)]
        self.output_dtype = dtypes[self.engine.get_tensor_dtype(self.output_name)]
        lo, _, hi = self.engine.get_tensor_profile_shape(self.input_name, 0)
        self.batch_range = (int(lo[0]), int(hi[0]))
        self.image_shape = tuple(int(d) for d in hi[1:])
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
        """torch tensor (any device) -> output tensor on the GPU."""
        import torch

        images = images.to(self.device, self.input_dtype).contiguous()
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        output = self._bind(images)
        self._launch()
        self.stream.synchronize()
        return output

    def __call__(self, images: np.ndarray) -> np.ndarray:
        import torch

        return self.infer(torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))).float().cpu().numpy()

    def evaluate(self, loader) -> dict:
        return score(self, loader)

    def times(self, batch: int, *, warmup: int = 20, runs: int = 100, cuda_graph: bool = False) -> list[float]:
        """GPU seconds per run of one batch of random images (CUDA events; optionally a CUDA graph)."""
        import torch

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
        self, batch_sizes: Sequence[int], *, warmup: int = 20, runs: int = 100, cuda_graph: bool = False
    ) -> list[LatencyStats]:
        return [latency_stats(self.times(b, warmup=warmup, runs=runs, cuda_graph=cuda_graph), b) for b in batch_sizes]


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
    """Build the INT8 engine from the QDQ file and the FP16 reference from the FP32 file; time, score both."""
    out = Path(out_dir)
    result: dict = {"batch_sizes": list(batch_sizes), "cuda_graph": cuda_graph}
    for precision, onnx_path in (("int8", int8_onnx), ("fp16", fp32_onnx)):
        built = build_engine(
            onnx_path,
            out / f"{precision}.engine",
            precision=precision,
            batch_sizes=batch_sizes,
            timing_cache=out / "timing.cache",
        )
        engine = TensorRTEngine(built.engine_path)
        stats = engine.benchmark(batch_sizes, warmup=warmup, runs=runs, cuda_graph=cuda_graph)
        result[precision] = {
            "build": built.as_dict(),
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
