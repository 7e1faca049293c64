"""Engines that need an NVIDIA GPU: TensorRT INT8/FP16 engines built and run, and the PyTorch CUDA reference.
Each test skips with the reason where TensorRT or a GPU is absent (the CPU machines here; NVIDIA's container
with --gpus all runs them: docker/run-ci.sh)."""

from __future__ import annotations

import numpy as np
import pytest

from repq.engines import tensorrt as trt_engine

UNAVAILABLE = trt_engine.tensorrt_unavailable_reason()
needs_tensorrt = pytest.mark.skipif(UNAVAILABLE is not None, reason=str(UNAVAILABLE))


@pytest.mark.skipif(not __import__("torch").cuda.is_available(),
                    reason="needs a CUDA GPU: runs the PyTorch CUDA reference engine itself")
def test_torch_cuda_reference_matches_the_cpu_model_and_times_with_and_without_graphs():
    import torch

    from repq.engines.torch_cuda import TorchCudaEngine
    from repq.reparam import create_model, fuse_model

    model = fuse_model(create_model("repvgg_a0", num_classes=10, cifar=True, width_mult=0.25)).eval()
    images = np.random.default_rng(3).standard_normal((4, 3, 32, 32)).astype(np.float32)
    with torch.no_grad():
        expected = model(torch.from_numpy(images)).numpy()
    scale = np.abs(expected).max()
    for dtype, tolerance in (("fp32", 1e-2), ("fp16", 5e-2)):  # fp32 convs may run in TF32 on the GPU
        engine = TorchCudaEngine(model, dtype=dtype)
        assert np.abs(engine(images) - expected).max() <= tolerance * scale, dtype
    for graph in (True, False):
        stats = engine.benchmark((3, 32, 32), [1, 8], warmup=2, runs=5, cuda_graph=graph)
        assert [s.batch_size for s in stats] == [1, 8] and all(s.median_ms > 0 for s in stats)


# ---------------------------------------------------------------- on a GPU with TensorRT


@needs_tensorrt
def test_int8_engine_matches_onnxruntime_and_runs_int8(tmp_path):
    from test_openvino import build_net, ort_reference

    qdq = build_net(tmp_path / "qdq.onnx", quantized=True)
    built = trt_engine.build_engine(qdq, tmp_path / "int8.engine", precision="int8", batch_sizes=[1, 4, 8])
    assert built.engine_path.is_file() and built.log_path.is_file() and built.layers_path.is_file()
    assert (tmp_path / "timing.cache").is_file()
    assert built.coverage["compute_layers"] >= 2 and built.coverage["int8_layers"] >= 2
    engine = trt_engine.TensorRTEngine(built.engine_path)
    images = np.random.default_rng(1).uniform(-2.5, 2.5, (4, 3, 12, 12)).astype(np.float32)
    out, ref = engine(images), ort_reference(qdq, images)
    assert np.abs(out - ref).max() <= 0.05 * np.abs(ref).max()
    stats = engine.benchmark((3, 12, 12), [1, 8], warmup=2, runs=5, cuda_graph=True)
    assert [s.batch_size for s in stats] == [1, 8] and all(s.median_ms > 0 for s in stats)
    assert engine.describe()["input_dtype"] == "float32"


@needs_tensorrt
def test_fp16_engine_matches_onnxruntime(tmp_path):
    from test_openvino import build_net, ort_reference

    fp32 = build_net(tmp_path / "fp32.onnx", quantized=False)
    built = trt_engine.build_engine(fp32, tmp_path / "fp16.engine", precision="fp16", batch_sizes=[1, 4])
    if built.plan.fp16_onnx:  # strongly typed: built from the FP16 conversion, I/O kept float32
        assert (tmp_path / "fp16.onnx").is_file()
    engine = trt_engine.TensorRTEngine(built.engine_path)
    images = np.random.default_rng(2).uniform(-1, 1, (4, 3, 12, 12)).astype(np.float32)
    np.testing.assert_allclose(engine(images), ort_reference(fp32, images), rtol=2e-2, atol=2e-2)
    assert engine.input_dtype == __import__("torch").float32


@needs_tensorrt
def test_open_engine_builds_the_plan_beside_the_onnx_file_once(tmp_path):
    from test_openvino import build_net, ort_reference

    from repq.engines.engine import open_engine

    qdq = build_net(tmp_path / "net.trt.onnx", quantized=True)
    engine = open_engine(qdq, "tensorrt", batch_sizes=(1, 4))
    plan = tmp_path / "net.trt.int8.plan"
    for sidecar in ("", ".log", ".layers.json", ".build.json"):
        assert (tmp_path / f"net.trt.int8.plan{sidecar}").is_file(), sidecar
    assert engine.precision == "int8" and engine.describe()["built_now"]
    images = np.random.default_rng(4).uniform(-2.5, 2.5, (9, 3, 12, 12)).astype(np.float32)  # 9 > 4: chunked
    ref = ort_reference(qdq, images)
    assert np.abs(engine(images) - ref).max() <= 0.05 * np.abs(ref).max()
    stamp = plan.stat().st_mtime_ns
    again = open_engine(qdq, "tensorrt", batch_sizes=(1, 4))  # fresh: loaded, not rebuilt
    assert plan.stat().st_mtime_ns == stamp and not again.describe()["built_now"]
    direct = open_engine(plan, "tensorrt")  # a plan path loads directly
    assert direct.onnx_path == qdq and np.abs(direct(images) - ref).max() <= 0.05 * np.abs(ref).max()


# ---------------------------------------------------------------- FP16 ONNX for the strongly typed FP16 build
