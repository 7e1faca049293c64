"""TensorRT engine: what needs no GPU (build plan per version, profile shapes, the layer-info parser, the
report, latency statistics) is tested here on real inputs; building and running engines needs TensorRT and a
GPU and skips with the reason where those are absent."""

from __future__ import annotations

import json

import numpy as np
import pytest

from repq.engines import tensorrt as trt_engine
from repq.engines.timing import latency_stats, speedup, time_calls, topk_accuracy
from repq.errors import RepqError

UNAVAILABLE = trt_engine.tensorrt_unavailable_reason()
needs_tensorrt = pytest.mark.skipif(UNAVAILABLE is not None, reason=str(UNAVAILABLE))


# ---------------------------------------------------------------- latency statistics


def test_latency_stats_by_hand():
    times = [i / 1000 for i in range(10, 0, -1)]  # 1..10 ms, unordered
    stats = latency_stats(times, batch_size=8)
    # Linear-interpolated percentiles of 1..10: p50 = 5.5, p90 at rank 8.1 -> 9.1, p99 at rank 8.91 -> 9.91.
    assert stats.median_ms == pytest.approx(5.5)
    assert stats.p90_ms == pytest.approx(9.1)
    assert stats.p99_ms == pytest.approx(9.91)
    assert stats.mean_ms == pytest.approx(5.5)
    assert stats.fps == pytest.approx(8 / 0.0055)
    one = latency_stats([0.002], batch_size=1)
    assert speedup(one, stats) == pytest.approx(2.0 / (5.5 / 8))
    with pytest.raises(RepqError):
        latency_stats([], 1)
    with pytest.raises(RepqError):
        latency_stats([0.001, float("nan")], 1)


def test_time_calls_counts_warmup_and_runs():
    calls = []
    times = time_calls(lambda: calls.append(1), warmup=3, runs=7)
    assert len(calls) == 10 and len(times) == 7 and all(t >= 0 for t in times)


def test_topk_accuracy_by_hand():
    logits = np.array([[0.1, 0.9, 0.0], [0.8, 0.15, 0.05], [0.2, 0.3, 0.5], [0.6, 0.3, 0.1]], np.float32)
    labels = np.array([1, 1, 0, 2])  # top-1 right: row 0; top-2 adds row 1 (0.15 is 2nd)
    batches = [
        (np.zeros((2, 1), np.float32) + [[0], [1]], labels[:2]),
        (np.zeros((2, 1)) + [[2], [3]], labels[2:]),
    ]
    result = topk_accuracy(lambda x: logits[x[:, 0].astype(int)], batches, topk=(1, 2))
    assert result == {"top1": 25.0, "top2": 50.0, "images": 4}


# ---------------------------------------------------------------- builder flags per TensorRT version


@pytest.mark.parametrize(
    "version, precision, strongly_typed, flags, fp16_onnx",
    [
        ("8.6.1", "int8", False, ("INT8", "FP16"), False),
        ("9.3.0", "int8", False, ("INT8", "FP16"), False),
        ("10.0.1", "int8", True, (), False),
        ("10.8.0.43", "int8", True, (), False),
        ("11.1.0", "int8", True, (), False),
        ("8.6.1", "fp16", False, ("FP16",), False),
        ("10.13.3", "fp16", False, ("FP16",), False),
        ("11.0.0", "fp16", True, (), True),
    ],
)
def test_build_plan_per_version(version, precision, strongly_typed, flags, fp16_onnx):
    plan = trt_engine.build_plan(version, precision)
    assert (plan.strongly_typed, plan.flags, plan.fp16_onnx) == (strongly_typed, flags, fp16_onnx)
    # TensorRT 11 removed every precision flag: no plan may ask for one there.
    if plan.version >= (11, 0):
        assert plan.flags == ()


def test_build_plan_refuses_old_or_unknown():
    with pytest.raises(RepqError, match="too old"):
        trt_engine.build_plan("8.5.3", "int8")
    with pytest.raises(RepqError, match="cannot read TensorRT version"):
        trt_engine.build_plan("ten", "int8")
    with pytest.raises(RepqError, match="unknown TensorRT precision"):
        trt_engine.build_plan("10.8", "int4")


# ---------------------------------------------------------------- optimization profile


def test_profile_shapes_cover_every_batch():
    shapes = trt_engine.profile_shapes(["batch", 3, 224, 224], [8, 1, 32, 8])
    assert shapes.min == (1, 3, 224, 224) and shapes.opt == (32, 3, 224, 224) and shapes.max == (32, 3, 224, 224)
    assert trt_engine.profile_shapes([None, 3, 32, 32], [1, 8], opt_batch=8).opt == (8, 3, 32, 32)
    assert trt_engine.profile_shapes([4, 3, 32, 32], [4]).max == (4, 3, 32, 32)


@pytest.mark.parametrize(
    "dims, batches, opt, message",
    [
        ([1, 3, 32, 32], [1, 8], None, "fixed batch"),
        (["batch", 3, "h", "w"], [1], None, "dynamic non-batch"),
        (["batch", 3, 32, 32], [0, 4], None, "positive"),
        (["batch", 3, 32, 32], [1, 8], 16, "outside"),
    ],
)
def test_profile_shapes_refuse_impossible_profiles(dims, batches, opt, message):
    with pytest.raises(RepqError, match=message):
        trt_engine.profile_shapes(dims, batches, opt)


def test_onnx_input_reads_dynamic_batch(tmp_path):
    from test_openvino import build_net

    path = build_net(tmp_path / "qdq.onnx", quantized=True)
    name, dims = trt_engine.onnx_input(path)
    assert name == "input" and dims == ["batch", 3, 12, 12]
    assert trt_engine.profile_shapes(dims, [1, 8]).max == (8, 3, 12, 12)
    with pytest.raises(RepqError, match="does not exist"):
        trt_engine.onnx_input(tmp_path / "missing.onnx")


# ---------------------------------------------------------------- engine information parser

# The shape of IEngineInspector.get_engine_information(JSON) at ProfilingVerbosity.DETAILED (TensorRT 10).
ENGINE_INFO = {
    "Layers": [
        {
            "Name": "Reformatting CopyNode for Input Tensor 0 to conv1",
            "LayerType": "Reformat",
            "Inputs": [{"Name": "input", "Format/Datatype": "Row major linear FP32"}],
            "Outputs": [{"Name": "r", "Format/Datatype": "Channel major INT8 format where channel % 32 == 0"}],
            "TacticName": "",
            "Metadata": "",
        },
        {
            "Name": "conv1 + relu1",
            "LayerType": "CaskConvolution",
            "ParameterType": "Convolution",
            "Inputs": [{"Name": "r", "Format/Datatype": "Int8 NC/32HW32"}],
            "Outputs": [{"Name": "a1", "Format/Datatype": "Int8 NC/32HW32"}],
            "Weights": {"Type": "Int8", "Count": 216},
            "TacticName": "sm90_xmma_fprop_implicit_gemm_interleaved_i8i8_i8i32_f32",
            "Metadata": "[ONNX Layer: /conv1/Conv]\u001e[ONNX Layer: /relu1/Relu]",
        },
        {
            "Name": "conv2",
            "LayerType": "CaskConvolution",
            "ParameterType": "Convolution",
            "Inputs": [{"Name": "a1", "Format/Datatype": "Int8 NC/32HW32"}],
            "Outputs": [{"Name": "c2", "Format/Datatype": "Half NC/8HW8"}],
            "Weights": {"Type": "Float", "Count": 1152},
            "TacticName": "sm90_xmma_fprop_f32f32_tf32f32",
            "Metadata": "[ONNX Layer: /conv2/Conv]",
        },
        {
            "Name": "pool",
            "LayerType": "CaskPooling",
            "ParameterType": "Pooling",
            "Inputs": [{"Name": "c2", "Format/Datatype": "Half NC/8HW8"}],
            "Outputs": [{"Name": "p", "Format/Datatype": "Half"}],
            "Metadata": "[ONNX Layer: /pool/GlobalAveragePool]",
        },
        {
            "Name": "fc",
            "LayerType": "CaskGemmConvolution",
            "ParameterType": "Convolution",
            "Inputs": [{"Name": "p", "Format/Datatype": "Channel major FP16 format where channel % 8 == 0"}],
            "Outputs": [{"Name": "logits", "Format/Datatype": "Row major linear FP32"}],
            "Weights": {"Type": "Half", "Count": 80},
            "Metadata": "[ONNX Layer: /fc/Gemm]",
        },
    ],
    "Bindings": ["input", "logits"],
}


def test_engine_info_parser_finds_int8_layers_and_names_fallbacks():
    layers = trt_engine.parse_engine_info(json.dumps(ENGINE_INFO))
    assert [layer.name for layer in layers if layer.is_compute] == ["conv1 + relu1", "conv2", "fc"]
    conv1 = layers[1]
    assert conv1.precision == "int8" and conv1.onnx_layers == ("/conv1/Conv", "/relu1/Relu")
    assert layers[2].precision == "fp32"  # INT8 activations read by a float-weight kernel: not INT8
    assert layers[4].precision == "fp16" and layers[0].output_type == "int8"
    coverage = trt_engine.int8_coverage(layers)
    assert coverage["compute_layers"] == 3 and coverage["int8_layers"] == 1
    assert coverage["int8_fraction"] == pytest.approx(1 / 3)
    assert [(f["name"], f["precision"]) for f in coverage["fallback"]] == [("conv2", "fp32"), ("fc", "fp16")]
    assert coverage["fallback"][1]["onnx_layers"] == ["/fc/Gemm"]


def test_engine_info_parser_reads_split_type_fields():
    # TensorRT 11 replaced the "Format/Datatype" string with separate "DataType" and "Format" fields.
    entry = {
        "Name": "conv1",
        "LayerType": "CaskConvolution",
        "ParameterType": "Convolution",
        "Inputs": [{"Name": "x", "DataType": "Int8", "Format": "Channel major INT8 format (kCHW32)"}],
        "Outputs": [{"Name": "y", "DataType": "Half", "Format": "Row major linear FP16 format (kLINEAR)"}],
        "Weights": {"Type": "Int8", "Count": 216},
    }
    (layer,) = trt_engine.parse_engine_info({"Layers": [entry], "I/O Tensors": []})
    assert (layer.input_type, layer.output_type, layer.precision) == ("int8", "fp16", "int8")


def test_engine_info_parser_refuses_non_detailed_info():
    with pytest.raises(RepqError, match="DETAILED"):
        trt_engine.parse_engine_info({"Layers": ["conv1 + relu1", "fc"], "Bindings": []})
    with pytest.raises(RepqError, match="no 'Layers'"):
        trt_engine.parse_engine_info("{}")


def test_report_section_names_fallbacks_and_speedup():
    def lat(batch, median):
        return latency_stats([median / 1e3] * 3, batch).as_dict()

    coverage = trt_engine.int8_coverage(trt_engine.parse_engine_info(ENGINE_INFO))
    build = {"coverage": coverage, "trt_version": "10.8.0", "plan": {"reason": "strongly typed"}}
    result = {
        "int8": {"build": build, "latency": [lat(1, 0.5), lat(8, 1.0)], "accuracy": None},
        "fp16": {"build": build, "latency": [lat(1, 0.8), lat(8, 2.5)], "accuracy": None},
    }
    result["speedup_int8_over_fp16"] = {
        str(a["batch_size"]): speedup(
            latency_stats([b["median_ms"] / 1e3], b["batch_size"]),
            latency_stats([a["median_ms"] / 1e3], a["batch_size"]),
        )
        for a, b in zip(result["int8"]["latency"], result["fp16"]["latency"], strict=True)
    }
    assert result["speedup_int8_over_fp16"]["8"] == pytest.approx(2.5)
    text = trt_engine.report_section(result)
    assert "1 of 3 compute layers (33.3%)" in text
    assert "`conv2` (fp32)" in text and "`fc` (fp16)" in text
    assert "| 8 | 2.500 | 1.000 |" in text and "2.50x" in text and "1.60x" in text


# ---------------------------------------------------------------- entry points without TensorRT / GPU


@pytest.mark.skipif(UNAVAILABLE is None, reason="TensorRT and a GPU are present: the refusal path cannot run")
def test_entry_points_say_why_in_one_line(tmp_path):
    from test_openvino import build_net

    path = build_net(tmp_path / "qdq.onnx", quantized=True)
    for call in (
        lambda: trt_engine.build_engine(path, tmp_path / "x.engine"),
        lambda: trt_engine.TensorRTEngine(tmp_path / "x.engine"),
        lambda: trt_engine.measure(path, path, tmp_path),
    ):
        with pytest.raises(RepqError) as err:
            call()
        assert "\n" not in str(err.value) and ("TensorRT" in str(err.value) or "GPU" in str(err.value))
    assert not (tmp_path / "x.engine").exists()


def test_torch_cuda_reference_without_gpu_says_so():
    import torch

    from repq.engines.torch_cuda import TorchCudaEngine, cuda_unavailable_reason

    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the refusal path cannot run")
    reason = cuda_unavailable_reason()
    assert reason and "\n" not in reason
    with pytest.raises(RepqError, match="needs an NVIDIA GPU"):
        TorchCudaEngine(torch.nn.Conv2d(3, 4, 3))


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
    stats = engine.benchmark([1, 8], warmup=2, runs=5, cuda_graph=True)
    assert [s.batch_size for s in stats] == [1, 8] and all(s.median_ms > 0 for s in stats)


@needs_tensorrt
def test_fp16_engine_matches_onnxruntime(tmp_path):
    from test_openvino import build_net, ort_reference

    fp32 = build_net(tmp_path / "fp32.onnx", quantized=False)
    built = trt_engine.build_engine(fp32, tmp_path / "fp16.engine", precision="fp16", batch_sizes=[1, 4])
    engine = trt_engine.TensorRTEngine(built.engine_path)
    images = np.random.default_rng(2).uniform(-1, 1, (4, 3, 12, 12)).astype(np.float32)
    np.testing.assert_allclose(engine(images), ort_reference(fp32, images), rtol=2e-2, atol=2e-2)
