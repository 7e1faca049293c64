"""The ONNX Runtime engine: outputs equal PyTorch's, accuracy counted on its outputs, timing statistics."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from repq.engines.export import export_float
from repq.engines.onnxruntime import OrtEngine
from repq.errors import RepqError


@pytest.fixture(scope="module")
def batches():
    gen = torch.Generator().manual_seed(3)
    return [(torch.randn(5, 3, 8, 8, generator=gen), torch.randint(0, 6, (5,), generator=gen)) for _ in range(4)]


def test_fp32_engine_equals_pytorch(model, fp32_file, batches):
    engine = OrtEngine(fp32_file)
    assert engine.threads == os.cpu_count()
    images = batches[0][0]
    with torch.no_grad():
        assert np.allclose(engine(images.numpy()), model(images).numpy(), atol=1e-5)


def test_accuracy_is_counted_on_the_engine_outputs(model, fp32_file, batches):
    result = OrtEngine(fp32_file, threads=1).evaluate(batches)
    with torch.no_grad():
        logits = torch.cat([model(x) for x, _ in batches])
    labels = torch.cat([y for _, y in batches])
    top1 = 100.0 * (logits.argmax(1) == labels).float().mean().item()
    top5 = 100.0 * (logits.topk(5, 1).indices == labels[:, None]).any(1).float().mean().item()
    assert result["images"] == 20
    assert result["top1"] == pytest.approx(top1) and result["top5"] == pytest.approx(top5)


def test_benchmark_statistics(fp32_file):
    stats = OrtEngine(fp32_file, threads=1).benchmark((3, 8, 8), (1, 4), warmup=3, runs=50)
    assert [s.batch_size for s in stats] == [1, 4]
    for s in stats:
        assert s.runs == 50 and s.p90_ms >= s.median_ms > 0
        assert s.fps == pytest.approx(s.batch_size * 1e3 / s.median_ms)


def test_fixed_batch_file_runs_any_number_of_images(model, tmp_path, batches):
    path = tmp_path / "b2.onnx"
    path.write_bytes(export_float(model, (2, 3, 8, 8), 17, dynamic_batch=False).SerializeToString())
    engine = OrtEngine(path, threads=1)
    images = batches[0][0]  # 5 images through a batch-2 file: chunks of 2 with the last padded
    with torch.no_grad():
        assert np.allclose(engine(images.numpy()), model(images).numpy(), atol=1e-5)
    with pytest.raises(RepqError, match="fixed batch of 2"):
        engine.benchmark((3, 8, 8), (4,), runs=1)


def test_bad_input(fp32_file, tmp_path):
    with pytest.raises(RepqError, match="does not exist"):
        OrtEngine(tmp_path / "missing.onnx")
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not an onnx file")
    with pytest.raises(RepqError, match="cannot load"):
        OrtEngine(broken)
    nan = [(torch.full((2, 3, 8, 8), float("nan")), torch.zeros(2, dtype=torch.long))]
    with pytest.raises(RepqError, match="NaN"):
        OrtEngine(fp32_file, threads=1).evaluate(nan)
