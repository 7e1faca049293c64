"""The ONNX Runtime CPU engine: a session over one ONNX file (FP32 or QDQ INT8), its accuracy and its speed.

Accuracy is measured on the engine itself (the session's outputs), latency as the median/p90 of >= 50 timed
runs after warm-up, per batch size (`engines.timing`). `op_types()` lists the ops of the graph ORT actually
runs after its optimizations, which is how a test sees whether Q/DQ became QLinearConv/QGemm.
"""

from __future__ import annotations

import collections
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from repq.engines.timing import LatencyStats, latency_stats, score, time_calls
from repq.errors import RepqError


def _ort():
    import onnxruntime

    return onnxruntime


class OrtEngine:
    """An ONNX Runtime CPU session with all graph optimizations; `threads` None or 0: the CPU count."""

    def __init__(self, onnx_path: str | os.PathLike, *, threads: int | None = None, optimized_path=None):
        ort = _ort()
        self.path = Path(onnx_path)
        if not self.path.is_file():
            raise RepqError(f"ONNX file {self.path} does not exist: export the model first (engines.export)")
        self.threads = int(threads or os.cpu_count() or 1)
        options = ort.SessionOptions()
        options.intra_op_num_threads = self.threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        if optimized_path is not None:
            options.optimized_model_filepath = str(optimized_path)
        try:
            self.session = ort.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])
        except Exception as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise RepqError(f"ONNX Runtime cannot load {self.path} ({first[:200]}): "
                            "re-export the ONNX file") from err
        inputs = self.session.get_inputs()
        if len(inputs) != 1:
            raise RepqError(f"{self.path} has {len(inputs)} inputs; the ONNX Runtime engine runs one-input "
                            "classifiers: export with a single image input")
        self.input_name = inputs[0].name
        self.input_shape = tuple(d if isinstance(d, int) else -1 for d in inputs[0].shape)
        self.fixed_batch = self.input_shape[0] if self.input_shape[0] > 0 else None

    def __call__(self, images: np.ndarray) -> np.ndarray:
        images = np.ascontiguousarray(images, dtype=np.float32)
        self._check_input(images)
        if self.fixed_batch is None or len(images) == self.fixed_batch:
            return self.session.run(None, {self.input_name: images})[0]
        outputs = []  # a fixed-batch file: run in chunks of its batch, padding the last one
        for start in range(0, len(images), self.fixed_batch):
            chunk = images[start:start + self.fixed_batch]
            pad = self.fixed_batch - len(chunk)
            if pad:
                chunk = np.concatenate([chunk, np.zeros((pad, *chunk.shape[1:]), np.float32)])
            outputs.append(self.session.run(None, {self.input_name: chunk})[0][: self.fixed_batch - pad])
        return np.concatenate(outputs)

    def _check_input(self, images: np.ndarray) -> None:
        """A one-line error for images of another size or channel count than the file takes (ONNX Runtime's own
        is an INVALID_ARGUMENT traceback)."""
        want, got = self.input_shape[1:], images.shape[1:]
        if len(want) == len(got) and all(w <= 0 or w == g for w, g in zip(want, got, strict=True)):
            return
        shown = "x".join(str(w) if w > 0 else "N" for w in want)
        size = f" with --image-size {got[-1]}" if len(got) == 3 and got[-1] == got[-2] else ""
        raise RepqError(f"{self.path} takes {shown} images, these are {'x'.join(map(str, got))}: score it on "
                        f"images of its size (the preset it was made with), or export it again{size}")

    def evaluate(self, loader) -> dict:
        """top-1/top-5 (percent) over (images, labels) batches, or the loader's own score (PSNR)."""
        return score(self, loader, _numpy_batches)

    def times(self, image_shape: Sequence[int], batch: int, *, warmup: int = 10, runs: int = 50,
              seed: int = 0) -> list[float]:
        """Wall seconds of `runs` synchronous runs of one batch of random images of (C, H, W), after warm-up."""
        if self.fixed_batch is not None and batch != self.fixed_batch:
            raise RepqError(f"{self.path} has a fixed batch of {self.fixed_batch}, not {batch}: "
                            "export with dynamic_batch=True to time several batch sizes")
        rng = np.random.default_rng(seed)
        feed = {self.input_name: rng.standard_normal((batch, *image_shape), dtype=np.float32)}
        return time_calls(lambda: self.session.run(None, feed), warmup=warmup, runs=runs)

    def benchmark(
        self,
        image_shape: Sequence[int],
        batch_sizes: Sequence[int] = (1, 8),
        *,
        warmup: int = 10,
        runs: int = 50,
        seed: int = 0,
    ) -> list[LatencyStats]:
        """Latency of one synchronous run per batch size on random images of (C, H, W)."""
        if runs < 1:
            raise RepqError("a benchmark needs at least one timed run: use runs >= 50 for stable medians")
        return [latency_stats(self.times(image_shape, batch, warmup=warmup, runs=runs, seed=seed), batch)
                for batch in batch_sizes]

    def op_types(self) -> collections.Counter:
        """Op types of the graph after ORT's optimizations (the graph the session runs)."""
        return optimized_op_types(self.path, self.threads)

    def describe(self) -> dict:
        return {"engine": "onnxruntime", "onnx": str(self.path), "threads": self.threads,
                "input_shape": list(self.input_shape), "version": _ort().__version__}


def optimized_op_types(onnx_path: str | os.PathLike, threads: int = 1) -> collections.Counter:
    import onnx

    with tempfile.TemporaryDirectory() as tmp:
        optimized = Path(tmp) / "optimized.onnx"
        OrtEngine(onnx_path, threads=threads, optimized_path=optimized)
        return collections.Counter(node.op_type for node in onnx.load(str(optimized)).graph.node)


def _numpy_batches(loader):
    for batch in loader:
        images, labels = batch[0], batch[1]
        images = images.numpy() if hasattr(images, "numpy") else np.asarray(images)
        labels = labels.numpy() if hasattr(labels, "numpy") else np.asarray(labels)
        if not np.isfinite(images).all():
            raise RepqError("an evaluation batch holds NaN or inf values: "
                            "check the dataset and its normalisation")
        yield images, labels
