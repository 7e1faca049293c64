"""The one table of engine targets: which class runs each, the QDQ placement it reads, file suffix, GPU or not,
its options with their defaults, and how to ask whether it can run here.

Export, `open_engine` (engines/engine.py), the run stages and every CLI command dispatch through `TARGETS`; an
engine adds a row here, nothing else. Nothing in this module imports an engine: a row names its class and its
availability check as "module:attribute" strings, imported when the engine is opened.

`placement` names the Q/DQ layout `engines.export` writes (one of `PLACEMENTS`):
- ``tensorrt``: Q/DQ on every quantized conv/linear input and weight (per channel, axis 0) plus the residual
  input of an Add, symmetric int8 only -- TensorRT's explicit-quantization convention (OpenVINO reads it too).
- ``onnxruntime``: also a Q/DQ on each conv output, so ORT fuses Q/DQ into QLinearConv/QGemm; uint8 with
  zero point 0 after a ReLU (see `engines/export.py` for why that is exact, not a change of range).

`options` are keyword arguments of the engine's constructor with their defaults (`open_engine` passes them,
a caller's values override them); a None default means "the engine decides" (threads: the CPU count; TensorRT's
precision: int8 for a QDQ file, fp16 for a float one).
"""

from __future__ import annotations

import difflib
import importlib
import os
from dataclasses import dataclass, field

from repq.errors import RepqError

PLACEMENTS = ("tensorrt", "onnxruntime")


def _resolve(spec: str):
    """The attribute a "module:attribute" string names, imported now."""
    module, _, attribute = spec.partition(":")
    return getattr(importlib.import_module(module), attribute)


@dataclass(frozen=True)
class EngineTarget:
    name: str
    placement: str  # one of PLACEMENTS
    suffix: str  # of the exported QDQ ONNX file
    needs_gpu: bool
    engine: str  # "module:Class" of the engine, imported lazily
    options: dict = field(default_factory=dict)  # constructor keyword arguments and their defaults
    description: str = ""
    # "module:function" taking the file to run (or None) and returning None or the one-line reason the engine
    # cannot run it here; None: the engine always runs (its package is a dependency of repq).
    check: str | None = None

    def __post_init__(self):
        if self.placement not in PLACEMENTS:
            raise ValueError(f"engine target {self.name}: placement {self.placement!r} is not one of {PLACEMENTS}")

    def engine_class(self) -> type:
        return _resolve(self.engine)

    def unavailable_reason(self, path: str | os.PathLike | None = None) -> str | None:
        """None when this engine can run here (on `path`, when given), else the one-line reason it cannot."""
        return None if self.check is None else _resolve(self.check)(path)

    def select(self, **candidates) -> dict:
        """The candidates this engine reads (its option names), None values left out: how a command passes its
        shared flags (--threads) to whichever engine it opens."""
        return {k: v for k, v in candidates.items() if k in self.options and v is not None}


TARGETS: dict[str, EngineTarget] = {
    t.name: t
    for t in (
        EngineTarget(
            "onnxruntime", "onnxruntime", ".ort.onnx", False, "repq.engines.onnxruntime:OrtEngine",
            {"threads": None},
            "ONNX Runtime on the CPU: FP32 files, and INT8 ones through QLinearConv/QGemm kernels",
        ),
        EngineTarget(
            "tensorrt", "tensorrt", ".trt.onnx", True, "repq.engines.tensorrt:TensorRTEngine",
            {"precision": None, "batch_sizes": (1, 8, 32), "workspace_gb": 4.0, "cuda_graph": True,
             "plan_dir": None},
            "TensorRT on an NVIDIA GPU: INT8 from the explicit-quantization QDQ file, FP16 from a float file; "
            "the .plan is built beside the ONNX file",
            "repq.engines.tensorrt:tensorrt_unavailable_reason",
        ),
        EngineTarget(
            "openvino", "tensorrt", ".trt.onnx", False, "repq.engines.openvino:OpenVinoEngine",
            {"threads": None, "precision_hint": "f32"},
            "OpenVINO on the CPU: FP32 files, and INT8 ones from the TensorRT-placement QDQ file unchanged",
            "repq.engines.openvino:openvino_unavailable_reason",
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


def targets_help() -> str:
    """One line per target for a command's --help: name, CPU/GPU and description."""
    return "; ".join(f"{t.name} ({'GPU' if t.needs_gpu else 'CPU'}): {t.description}" for t in TARGETS.values())
