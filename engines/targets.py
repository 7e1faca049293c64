"""The one table of engine targets: the QDQ placement each engine reads, file suffix, whether it needs a GPU.

Export, the CLI and the benchmarks dispatch through `TARGETS`; an engine helper adds a row here, nothing else.
`placement` names the Q/DQ layout `engines.export` writes:
- ``tensorrt``: Q/DQ on every quantized conv/linear input and weight (per channel, axis 0) plus the residual
  input of an Add, symmetric int8 only -- TensorRT's explicit-quantization convention (OpenVINO reads it too).
- ``onnxruntime``: also a Q/DQ on each conv output, so ORT fuses Q/DQ into QLinearConv/QGemm; uint8 with
  zero point 0 after a ReLU (see `engines/export.py` for why that is exact, not a change of range).
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field

from repq.errors import RepqError

PLACEMENTS = ("tensorrt", "onnxruntime")


@dataclass(frozen=True)
class EngineTarget:
    name: str
    placement: str  # one of PLACEMENTS
    suffix: str  # of the exported QDQ ONNX file
    needs_gpu: bool
    options: dict = field(default_factory=dict)  # engine options and their defaults
    description: str = ""


TARGETS: dict[str, EngineTarget] = {
    t.name: t
    for t in (
        EngineTarget(
            "onnxruntime", "onnxruntime", ".ort.onnx", False,
            {"threads": 0, "batch_sizes": (1, 8)},  # threads 0: the CPU count
            "ONNX Runtime INT8 on the CPU (QLinearConv/QGemm kernels)",
        ),
        EngineTarget(
            "tensorrt", "tensorrt", ".trt.onnx", True,
            {"workspace_gb": 4, "batch_sizes": (1, 8), "cuda_graph": True},
            "TensorRT INT8 engine built from the explicit-quantization QDQ file",
        ),
        EngineTarget(
            "openvino", "tensorrt", ".trt.onnx", False,
            {"threads": 0, "batch_sizes": (1, 8), "precision_hint": "f32"},  # threads 0: the CPU count
            "OpenVINO INT8 on the CPU, running the TensorRT-placement QDQ file unchanged",
        ),
    )
}


def get_target(name: str) -> EngineTarget:
    """The row for `name`, or a one-line error that lists the targets and the closest match."""
    if name in TARGETS:
        return TARGETS[name]
    close = difflib.get_close_matches(str(name), TARGETS, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise RepqError(f"unknown engine target {name!r}{hint}: choose one of {', '.join(TARGETS)}")
