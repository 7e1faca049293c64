"""repq: re-parametrized CNNs to symmetric-INT8 engines that keep their FP32 accuracy."""

__version__ = "0.1.0"
