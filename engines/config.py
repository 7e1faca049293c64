"""Export, engine and benchmark settings as validated data (no torch import: the recipe reads them)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from repq.engines.targets import TARGETS

TargetName = Literal[tuple(TARGETS)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ExportConfig(Strict):
    """QDQ ONNX export: one Q/DQ placement per engine target (engines/targets.py)."""

    targets: list[TargetName] = Field(
        default_factory=lambda: ["onnxruntime", "tensorrt"], min_length=1,
        description="one QDQ file per placement: tensorrt's is the deployment artifact (ONNX Runtime runs it as "
                    "the ladder's QDQ step); onnxruntime's holds QLinearConv for the CPU engine",
    )
    opset: int = Field(17, ge=13, description="ONNX opset (13 or newer: per-channel Q/DQ)")
    dynamic_batch: bool = Field(True, description="a free batch dimension")


class EngineConfig(Strict):
    """Which engines score the exported files (accuracy measured on each engine itself)."""

    targets: list[TargetName] = Field(default_factory=lambda: ["onnxruntime"], min_length=1,
                                      description="engines that score and time every exported file")
    workspace_gb: float = Field(4.0, gt=0, description="TensorRT builder workspace (GiB)")


class BenchConfig(Strict):
    """Latency and throughput of each engine."""

    batch_sizes: list[Annotated[int, Field(ge=1)]] = Field(default_factory=lambda: [1, 32], min_length=1,
                                                           description="batch sizes to time")
    warmup: int = Field(5, ge=0, description="untimed runs first")
    iters: int = Field(30, ge=1, description="timed runs per batch size")
    threads: int | None = Field(None, ge=1, description="CPU threads for the CPU engines (default: all)")
