import pytest
import torch
from torch import nn


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    yield


def randomize_bn(model: torch.nn.Module, generator: torch.Generator | None = None) -> None:
    """Random BN affine parameters, so a fused model cannot match the train form by accident."""
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            with torch.no_grad():
                module.weight.uniform_(0.5, 1.5, generator=generator)
                module.bias.uniform_(-0.5, 0.5, generator=generator)


def warm_bn(model: torch.nn.Module, shape, steps: int = 3, dtype=torch.float32) -> None:
    """A few train-mode forwards on shifted random data: running statistics move away from their defaults."""
    model.train()
    with torch.no_grad():
        for _ in range(steps):
            model(torch.randn(*shape, dtype=dtype) * 2 + 0.5)
    model.eval()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(scope="module")
def model():
    """A tiny classifier (conv, ReLU, pool, linear; 6 classes on 3x8x8 images) for engine tests."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(8, 6)).eval()


@pytest.fixture(scope="module")
def fp32_file(model, tmp_path_factory):
    """``model``'s float ONNX file, dynamic batch."""
    from repq.engines.export import export_float

    path = tmp_path_factory.mktemp("engine") / "net_fp32.onnx"
    path.write_bytes(export_float(model, (1, 3, 8, 8), 17, dynamic_batch=True).SerializeToString())
    return path
