"""repq: re-parametrized CNNs to symmetric-INT8 engines that keep their FP32 accuracy.

The public API, one call per operation (imported on first use, so `import repq` stays light)::

    model = repq.convert_convs(torchvision.models.resnet18(num_classes=10), "acb")   # or repq.create_model(...)
    repq.adapt(detector)                              # a user's net: its RepVGG/QARepVGG blocks become repq's
    repq.import_checkpoint("RepVGG-A0-train.pth", "a0.pt")      # official/timm checkpoints -> a repq checkpoint
    quantized = repq.ptq(model, calib_loader, method="entropy")                       # NVIDIA's toolkit, INT8
    q = repq.repq_wrap(model, method="bnest_corrected", w_bits=8, a_bits=8)          # RepQ through merged kernels
    repq.finetune(q, train_loader, epochs=1, lr=0.01)
    repq.export(q, "model.ort.onnx", target="onnxruntime", input_shape=(1, 3, 32, 32))
    engine = repq.open_engine("model.ort.onnx", "onnxruntime")
    repq.evaluate(engine, val_loader), repq.benchmark(engine, (3, 32, 32), [1, 32])
"""

from __future__ import annotations

import importlib

from repq.version import __version__

# public name -> (module, attribute)
_API: dict[str, tuple[str, str]] = {
    # models
    "create_model": ("repq.reparam.models", "create_model"),
    "list_models": ("repq.reparam.models", "list_models"),
    "fuse_model": ("repq.reparam.convert", "fuse_model"),
    "convert_convs": ("repq.reparam.convert", "convert_convs"),
    "substitute_qarepvgg": ("repq.reparam.convert", "substitute_qarepvgg"),
    "adapt": ("repq.reparam.adapt", "adapt"),
    "import_checkpoint": ("repq.reparam.importers", "import_checkpoint"),
    # training
    "train": ("repq.training.train", "train"),
    "TrainConfig": ("repq.training.config", "TrainConfig"),
    # quantization
    "ptq": ("repq.quant.toolkit", "quantize"),
    "PTQConfig": ("repq.quant.config", "PTQConfig"),
    "qat": ("repq.quant.qat", "qat"),
    "QATConfig": ("repq.quant.config", "QATConfig"),
    "repq_wrap": ("repq.quant.finetune", "quantized_model"),
    "finetune": ("repq.quant.finetune", "finetune"),
    "FinetuneConfig": ("repq.quant.config", "FinetuneConfig"),
    "diagnose": ("repq.quant.doctor", "diagnose"),
    # files
    "load": ("repq.quant.artifacts", "load_artifact"),
    # engines
    "export": ("repq.api", "export"),
    "open_engine": ("repq.engines.engine", "open_engine"),
    "evaluate": ("repq.api", "evaluate"),
    "benchmark": ("repq.api", "benchmark"),
    # errors
    "RepqError": ("repq.errors", "RepqError"),
}
__all__ = ["__version__", *sorted(_API)]


def __getattr__(name: str):
    if name not in _API:
        raise AttributeError(f"module 'repq' has no attribute {name!r}")
    module, attribute = _API[name]
    value = getattr(importlib.import_module(module), attribute)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_API))
