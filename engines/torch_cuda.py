"""PyTorch on CUDA as the GPU reference that needs no TensorRT: FP16/FP32 deploy-model throughput and
fake-quant accuracy.

The deploy (fused) model runs in channels_last, optionally replayed as a CUDA graph per batch size, timed
with CUDA events like the TensorRT engine, so the two tables compare directly. Without a GPU every entry
point raises one RepqError line.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import numpy as np

from repq.engines.timing import LatencyStats, cuda_event_times, latency_stats, score
from repq.errors import RepqError

DTYPES = ("fp16", "fp32")


def cuda_unavailable_reason() -> str | None:
    """None when torch sees a CUDA GPU, else the one-line reason it does not."""
    import torch

    if not torch.cuda.is_available():
        built = torch.version.cuda
        why = (
            f"torch {torch.__version__} (CUDA {built}) sees no GPU"
            if built
            else f"torch {torch.__version__} is a CPU build"
        )
        return (
            f"PyTorch CUDA reference needs an NVIDIA GPU: {why}; run on a GPU machine (docker run --gpus all)"
        )
    return None


class TorchCudaEngine:
    """A copy of `model` on the GPU in fp16 or fp32, channels_last, run under torch.inference_mode."""

    def __init__(self, model, *, dtype: str = "fp16", channels_last: bool = True, device: str = "cuda"):
        import torch

        reason = cuda_unavailable_reason()
        if reason:
            raise RepqError(reason)
        if dtype not in DTYPES:
            raise RepqError(f"unknown dtype {dtype!r} for the PyTorch CUDA reference: choose one of {DTYPES}")
        self.device = torch.device(device)
        self.dtype = torch.float16 if dtype == "fp16" else torch.float32
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.model = copy.deepcopy(model).eval().to(self.device, self.dtype, memory_format=self.memory_format)
        self.stream = torch.cuda.Stream(device=self.device)

    def _prepare(self, images):
        return images.to(self.device, self.dtype).contiguous(memory_format=self.memory_format)

    def infer(self, images):
        import torch

        with torch.inference_mode():
            return self.model(self._prepare(images))

    def __call__(self, images: np.ndarray) -> np.ndarray:
        import torch

        return (
            self.infer(torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))).float().cpu().numpy()
        )

    def evaluate(self, loader) -> dict:
        return score(self, loader)

    def times(
        self,
        image_shape: Sequence[int],
        batch: int,
        *,
        warmup: int = 20,
        runs: int = 100,
        cuda_graph: bool = True,
    ) -> list[float]:
        """GPU seconds per forward of one batch of random images (CUDA events; optionally a CUDA graph)."""
        import torch

        static_input = self._prepare(torch.randn((batch, *image_shape)))
        with torch.inference_mode():
            with torch.cuda.stream(self.stream):  # let cuDNN pick its algorithms before any capture
                for _ in range(3):
                    self.model(static_input)
            self.stream.synchronize()
            if cuda_graph:
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, stream=self.stream):
                    self.model(static_input)
                return cuda_event_times(graph.replay, self.stream, warmup=warmup, runs=runs)
            return cuda_event_times(lambda: self.model(static_input), self.stream, warmup=warmup, runs=runs)

    def benchmark(
        self,
        image_shape: Sequence[int],
        batch_sizes: Sequence[int],
        *,
        warmup: int = 20,
        runs: int = 100,
        cuda_graph: bool = True,
    ) -> list[LatencyStats]:
        return [
            latency_stats(self.times(image_shape, b, warmup=warmup, runs=runs, cuda_graph=cuda_graph), b)
            for b in batch_sizes
        ]

    def describe(self) -> dict:
        import torch

        return {"engine": "torch_cuda", "dtype": str(self.dtype).removeprefix("torch."),
                "channels_last": self.memory_format == torch.channels_last, "device": str(self.device),
                "version": torch.__version__}


def fake_quant_accuracy(quantized_model, loader) -> dict:
    """Top-1/top-5 of a fake-quantized (ModelOpt) model run in fp32 on the GPU: the accuracy the INT8 engine
    should reproduce."""
    return TorchCudaEngine(quantized_model, dtype="fp32", channels_last=False).evaluate(loader)
