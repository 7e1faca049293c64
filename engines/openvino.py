"""OpenVINO on the CPU: runs an FP32 ONNX file, or the TensorRT-placement QDQ file unchanged, on x86.

OpenVINO reads explicit-quantization Q/DQ graphs the way TensorRT does (Q/DQ pairs around a conv become an
INT8 convolution), so the artifact built for the GPU gets an accuracy and speed check on any CPU. Which layers
really run in INT8 is read back from the compiled model, never assumed from the graph.

`import openvino` happens only inside this module, on first use.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from repq.engines.timing import LatencyStats, latency_stats, score, time_calls
from repq.errors import RepqError

# Layer types of the compiled CPU graph that do the arithmetic; INT8 coverage is counted over these.
COMPUTE_LAYER_TYPES = frozenset(
    {"Convolution", "GroupConvolution", "Deconvolution", "GroupDeconvolution", "FullyConnected", "MatMul"}
)
INT8_PRECISIONS = frozenset({"i8", "u8"})
# Layer types that are bookkeeping, not layers a user wants to read about.
_SKIPPED_LAYER_TYPES = frozenset({"Input", "Output", "Const", "Parameter", "Result"})


def _openvino():
    try:
        import openvino
    except ImportError as err:
        raise RepqError(f"OpenVINO is not installed ({err}): pip install -e '.[openvino]'") from err
    return openvino


def openvino_available() -> str | None:
    """None when OpenVINO can run here, else the one-line reason it cannot."""
    try:
        _openvino()
    except RepqError as err:
        return str(err)
    return None


def openvino_unavailable_reason(path: str | os.PathLike | None = None) -> str | None:
    """None when OpenVINO can run `path` here (any file, when None), else the one-line reason it cannot: it is
    not installed, or `path` is an INT8 (QDQ) file and OpenVINO's INT8 kernels are inexact on this CPU."""
    reason = openvino_available()
    if reason is None and path is not None:
        from repq.engines.engine import onnx_is_quantized

        if onnx_is_quantized(path):
            reason = openvino_int8_problem()
    return reason


def int8_kernel_error(max_weight_code: int = 127) -> float:
    """Largest error of OpenVINO's INT8 conv on this CPU, relative to the largest output, against the same QDQ
    conv in float (exact here: int8 codes times steps, summed far below 2^24). A probe of one 3x3 conv whose
    weights use codes up to `max_weight_code`; inputs are codes 0..127, as after a ReLU."""
    ov = _openvino()
    import torch
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    cin, cout, size = 16, 16, 8
    weight = (rng.integers(-max_weight_code, max_weight_code + 1, (cout, cin, 3, 3)) / 64).astype(np.float32)
    x = (rng.integers(0, 128, (2, cin, size, size)) / 128).astype(np.float32)
    steps = {"x_scale": np.float32(1 / 128), "w_scale": np.full(cout, 1 / 64, np.float32)}  # codes as drawn
    inits = [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(np.zeros(cout, np.int8), "w_zero"),
             numpy_helper.from_array(np.int8(0), "x_zero")]
    inits += [numpy_helper.from_array(np.asarray(v), k) for k, v in steps.items()]
    nodes = [helper.make_node("QuantizeLinear", ["input", "x_scale", "x_zero"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "x_scale", "x_zero"], ["xd"]),
             helper.make_node("QuantizeLinear", ["w", "w_scale", "w_zero"], ["wq"], axis=0),
             helper.make_node("DequantizeLinear", ["wq", "w_scale", "w_zero"], ["wd"], axis=0),
             helper.make_node("Conv", ["xd", "wd"], ["out"], pads=[1, 1, 1, 1])]
    shape = [2, cin, size, size]
    graph = helper.make_graph(nodes, "int8_probe", [helper.make_tensor_value_info("input", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    core = ov.Core()
    compiled = core.compile_model(core.read_model(model.SerializeToString(), b""), "CPU",
                                  {"INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": 1})
    got = compiled({0: x})[0]
    expected = torch.nn.functional.conv2d(torch.from_numpy(x), torch.from_numpy(weight), padding=1).numpy()
    return float(np.abs(got - expected).max() / np.abs(expected).max())


INT8_PROBE_TOLERANCE = 1e-4


@functools.cache
def openvino_int8_problem() -> str | None:
    """None when OpenVINO's INT8 kernels compute 8-bit weights exactly on this CPU, else the one-line reason: on
    CPUs without VNNI they are exact only for 7-bit weights, so TensorRT's 8-bit weights would be scored wrongly
    and INT8 files are refused there."""
    error = int8_kernel_error(127)
    if error <= INT8_PROBE_TOLERANCE:
        return None
    return (f"OpenVINO's INT8 kernels on this CPU are inexact for 8-bit weights (a one-conv probe is off by "
            f"{100 * error:.1f}% of its output; CPUs without VNNI need 7-bit weights): run the INT8 file "
            "with the onnxruntime target here, or OpenVINO on a CPU with VNNI")


@dataclass(frozen=True)
class LayerPrecision:
    """One layer of the compiled graph: its type, its run precision, and the ONNX nodes fused into it."""

    name: str
    layer_type: str
    precision: str
    original_names: tuple[str, ...]

    @property
    def is_compute(self) -> bool:
        return self.layer_type in COMPUTE_LAYER_TYPES

    @property
    def is_int8(self) -> bool:
        return self.precision in INT8_PRECISIONS


def int8_coverage(layers: Sequence[LayerPrecision]) -> dict:
    """How many compute layers (conv, FC, matmul) run in INT8, naming those that fell back to float."""
    compute = [layer for layer in layers if layer.is_compute]
    int8 = [layer for layer in compute if layer.is_int8]
    fallback = [
        {"name": layer.name, "type": layer.layer_type, "precision": layer.precision}
        for layer in compute
        if not layer.is_int8
    ]
    return {
        "compute_layers": len(compute),
        "int8_layers": len(int8),
        "int8_fraction": len(int8) / len(compute) if compute else 0.0,
        "fallback": fallback,
    }


class OpenVinoEngine:
    """A compiled OpenVINO CPU model of one ONNX file.

    precision_hint="f32" keeps every layer that the file does not quantize in FP32 (on CPUs with BF16 units
    OpenVINO otherwise defaults to BF16, which is neither the ONNX semantics nor a fair FP32 reference).
    batch_size fixes the batch dimension; None keeps it dynamic (no slower for RepVGG-A0). cpu_pinning is off by
    default: on a CPU shared with other processes a thread pinned to a busy core waits for it.
    """

    def __init__(
        self,
        onnx_path: str | os.PathLike,
        *,
        threads: int | None = None,
        precision_hint: str = "f32",
        batch_size: int | None = None,
        performance_hint: str = "LATENCY",
        cpu_pinning: bool = False,
    ):
        ov = _openvino()
        self.path = Path(onnx_path)
        if not self.path.is_file():
            raise RepqError(f"ONNX file {self.path} does not exist: export the model first (engines.export)")
        self.threads = int(threads or os.cpu_count() or 1)
        core = ov.Core()
        try:
            model = core.read_model(str(self.path))
        except Exception as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise RepqError(
                f"OpenVINO cannot read {self.path} ({first[:200]}): re-export the ONNX file"
            ) from err
        if len(model.inputs) != 1:
            raise RepqError(
                f"{self.path} has {len(model.inputs)} inputs; the OpenVINO engine runs one-input "
                "classifiers: export with a single image input"
            )
        if any(op.get_type_name() == "FakeQuantize" for op in model.get_ops()):
            problem = openvino_int8_problem()
            if problem is not None:
                raise RepqError(f"{self.path}: {problem}")
        if batch_size is not None:
            shape = model.inputs[0].get_partial_shape()
            shape[0] = int(batch_size)
            model.reshape({model.inputs[0]: shape})
        self.batch_size = batch_size
        self.config = {
            "INFERENCE_NUM_THREADS": self.threads,
            "INFERENCE_PRECISION_HINT": precision_hint,
            "PERFORMANCE_HINT": performance_hint,
            "NUM_STREAMS": 1,
            "ENABLE_CPU_PINNING": cpu_pinning,
        }
        self.compiled = core.compile_model(model, "CPU", self.config)
        self._request = self.compiled.create_infer_request()
        self.input_shape = tuple(
            d.get_length() if d.is_static else -1 for d in self.compiled.inputs[0].get_partial_shape()
        )

    def __call__(self, images: np.ndarray) -> np.ndarray:
        images = np.ascontiguousarray(images, dtype=np.float32)
        self._request.infer({0: images})
        return self._request.get_output_tensor(0).data.copy()

    def compiled_property(self, name: str):
        return self.compiled.get_property(name)

    def layer_precisions(self) -> list[LayerPrecision]:
        """Every executed layer of the compiled graph with the precision OpenVINO chose for it."""
        layers = []
        for op in self.compiled.get_runtime_model().get_ordered_ops():
            info = op.get_rt_info()
            layer_type = info["layerType"].astype(str)
            if layer_type in _SKIPPED_LAYER_TYPES:
                continue
            original = info["originalLayersNames"].astype(str)
            layers.append(
                LayerPrecision(
                    name=op.get_friendly_name(),
                    layer_type=layer_type,
                    precision=info["runtimePrecision"].astype(str),
                    original_names=tuple(n for n in original.split(",") if n),
                )
            )
        return layers

    def int8_coverage(self) -> dict:
        return int8_coverage(self.layer_precisions())

    def times(self, image_shape: Sequence[int], batch: int, *, warmup: int = 10, runs: int = 50,
              seed: int = 0) -> list[float]:
        """Wall seconds of `runs` synchronous inferences of one batch of random images of (C, H, W).

        Each call gets an infer request of its own: the timed runs share the input array with the request
        (no copy in the loop), and a request whose input tensor wraps a batch-1 array cannot take a batch of 32
        afterwards (OpenVINO: "Could set new shape"); the request `__call__` uses is never shared.
        """
        if self.batch_size is not None and batch != self.batch_size:
            raise RepqError(
                f"this engine was compiled for batch {self.batch_size}, not {batch}: "
                "build one engine per batch size or use batch_size=None"
            )
        images = np.random.default_rng(seed).standard_normal((batch, *image_shape), dtype=np.float32)
        request = self.compiled.create_infer_request()
        request.infer({0: images}, share_inputs=True)  # first call allocates; keep it out of warm-up statistics
        return time_calls(lambda: request.infer({0: images}, share_inputs=True), warmup=warmup, runs=runs)

    def benchmark(
        self,
        image_shape: Sequence[int],
        batch_sizes: Sequence[int] | None = None,
        *,
        warmup: int = 10,
        runs: int = 50,
        seed: int = 0,
    ) -> list[LatencyStats]:
        """Latency of one synchronous inference per batch size, on random images of (C, H, W)."""
        if batch_sizes is None:
            if self.batch_size is None:
                raise RepqError("benchmark of a dynamic-batch engine needs batch_sizes: pass e.g. [1, 8]")
            batch_sizes = [self.batch_size]
        return [latency_stats(self.times(image_shape, batch, warmup=warmup, runs=runs, seed=seed), batch)
                for batch in batch_sizes]

    def evaluate(self, loader) -> dict:
        return score(self, loader)

    def describe(self) -> dict:
        return {
            "engine": "openvino",
            "onnx": str(self.path),
            "threads": self.threads,
            "precision_hint": str(self.compiled_property("INFERENCE_PRECISION_HINT")),
            "input_shape": list(self.input_shape),
            "int8": self.int8_coverage(),
        }


def layer_table(layers: Sequence[LayerPrecision]) -> list[dict]:
    return [asdict(layer) | {"original_names": list(layer.original_names)} for layer in layers]
