"""The few public calls that take any kind of model or engine and dispatch on it (the rest of the public API
is the library's own functions, see `repq/__init__.py`)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path


def export(model, path: str | Path, target: str = "onnxruntime", input_shape: Sequence[int] = (1, 3, 224, 224),
           **options) -> Path:
    """The ONNX file of ``model`` for engine ``target``: a QDQ file in that target's placement for a model
    quantized by ``repq.ptq`` (ModelOpt) or fine-tuned by ``repq.finetune`` (LSQ/RepQ), the float graph of its
    deploy form otherwise. ``options``: opset, dynamic_batch (default True: any batch size), dynamic_size,
    metadata."""
    from repq.engines.export import export_fp32, export_onnx
    from repq.quant.finetune import export_quantized
    from repq.quant.lsq import LSQQuantizer
    from repq.quant.toolkit import deploy_copy

    options.setdefault("dynamic_batch", True)
    if any(isinstance(m, LSQQuantizer) for m in model.modules()):
        return export_quantized(model, path, target, input_shape, **options)
    if any(type(m).__name__ == "TensorQuantizer" for m in model.modules()):
        return export_onnx(model, path, target, input_shape, **options)
    options.pop("specs", None)
    return export_fp32(deploy_copy(model.eval()), path, input_shape, **options)


def evaluate(model, loader, **options) -> dict:
    """Top-1/top-5 in percent (or PSNR for super-resolution) of a PyTorch model or an engine (``open_engine``)
    over a loader of (images, labels) batches."""
    import torch

    if isinstance(model, torch.nn.Module):
        from repq.training.evaluate import evaluate as evaluate_module

        result = evaluate_module(model, loader, **options)
        result["images"] = result.pop("count")
        return result
    return model.evaluate(loader)


def benchmark(engine, image_shape: Sequence[int], batch_sizes: Sequence[int] = (1, 8), **options) -> list:
    """Latency statistics (median, p90, p99, images/s) of an engine per batch size, on random inputs of
    ``image_shape`` (C, H, W)."""
    return engine.benchmark(tuple(image_shape), list(batch_sizes), **options)
