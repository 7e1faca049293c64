"""One way to open every engine of the table (`engines/targets.py`), and the protocol all engines share.

    engine = open_engine("model.trt.onnx", "tensorrt", precision="int8", batch_sizes=(1, 32))
    engine(images)                                    # float32 NCHW numpy -> numpy outputs
    engine.evaluate(loader)                           # top-1/top-5 (or the loader's own score: PSNR)
    engine.benchmark((3, 32, 32), [1, 32], warmup=5, runs=30)   # one LatencyStats per batch size
    engine.describe()                                 # what ran: engine, file, threads, precision, ...

`open_engine` looks the target up, asks whether it can run here (one RepqError line with the reason when not),
imports the engine class lazily and constructs it with the row's options, overridden by the caller's.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from repq.engines.targets import get_target
from repq.engines.timing import LatencyStats
from repq.errors import RepqError

QDQ_OPS = frozenset({"QuantizeLinear", "DequantizeLinear"})


@runtime_checkable
class Engine(Protocol):
    """What every engine of the table offers. `input_shape` is the file's NCHW input (-1 for a dynamic dim)."""

    input_shape: tuple[int, ...]

    def __call__(self, images: np.ndarray) -> np.ndarray: ...

    def evaluate(self, loader) -> dict: ...

    def benchmark(self, image_shape: Sequence[int], batch_sizes: Sequence[int], *, warmup: int,
                  runs: int) -> list[LatencyStats]: ...

    def describe(self) -> dict: ...


def onnx_is_quantized(path: str | os.PathLike) -> bool:
    """Whether an ONNX file holds Q/DQ nodes (an INT8 file) rather than a float graph."""
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as err:  # onnx raises DecodeError and others for a truncated file
        raise RepqError(f"{path} is not a readable ONNX file ({type(err).__name__}): re-export it") from err
    return any(node.op_type in QDQ_OPS for node in model.graph.node)


def open_engine(path: str | os.PathLike, target: str, **options) -> Engine:
    """The engine `target` on the file `path`, its table options overridden by `options` (None: the default).

    Raises one RepqError line for an unknown target or option, a missing file, or an engine that cannot run
    here (not installed, no GPU, inexact INT8 kernels on this CPU), with the reason and what to do.
    """
    row = get_target(target)
    unknown = sorted(set(options) - set(row.options))
    if unknown:
        known = ", ".join(row.options) or "none"
        raise RepqError(f"engine target {row.name} has no option {', '.join(unknown)}: its options are {known}")
    path = Path(path)
    if not path.is_file():
        raise RepqError(f"{path} does not exist: export the model first (repq export) or pass an existing file")
    reason = row.unavailable_reason(path)
    if reason:
        raise RepqError(f"{row.name} cannot run {path.name} here: {reason}")
    settings = dict(row.options) | {k: v for k, v in options.items() if v is not None}
    return row.engine_class()(path, **settings)


def input_image_shape(engine: Engine, default_size: int = 224) -> tuple[int, int, int]:
    """(C, H, W) to time an engine on: its file's fixed dims, `default_size` for dynamic height/width."""
    shape = tuple(engine.input_shape)
    channels = shape[1] if len(shape) == 4 and shape[1] > 0 else 3
    height = shape[2] if len(shape) == 4 and shape[2] > 0 else default_size
    width = shape[3] if len(shape) == 4 and shape[3] > 0 else default_size
    return channels, height, width


def bench_files(paths, targets, batch_sizes, *, image_size: int | None = None, warmup: int = 10,
                runs: int = 50, threads: int | None = None) -> tuple[list[dict], list[dict]]:
    """(rows, skipped): the latency of every file on every engine target per batch size, and the file/engine
    pairs that cannot run here with the reason (`repq bench`)."""
    from repq.engines.targets import get_target

    rows, skipped = [], []
    for path in paths:
        for name in targets:
            row = get_target(name)
            reason = row.unavailable_reason(path)
            if reason:
                skipped.append({"file": str(path), "engine": name, "reason": reason})
                continue
            engine = open_engine(path, name, **row.select(threads=threads, batch_sizes=tuple(sorted(set(batch_sizes)))))
            shape = input_image_shape(engine, default_size=image_size or 224)
            for stats in engine.benchmark(shape, list(batch_sizes), warmup=warmup, runs=runs):
                rows.append({"file": str(path), "engine": name, **stats.as_dict()})
    return rows, skipped
