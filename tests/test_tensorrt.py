"""TensorRT engine: what needs no GPU (build plan per version, profile shapes, the layer-info parser, the FP16
conversion, the report, latency statistics) is tested here on real inputs; building and running engines is in
tests/gpu/, which skips with the reason where TensorRT or a GPU is absent."""

from __future__ import annotations

import json

import numpy as np
import pytest

from repq.engines import tensorrt as trt_engine
from repq.engines.timing import latency_stats, speedup, time_calls, topk_accuracy
from repq.errors import RepqError

UNAVAILABLE = trt_engine.tensorrt_unavailable_reason()


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
        ("9.3.0", "fp16", False, ("FP16",), False),
        ("10.0.1", "fp16", True, (), True),
        ("10.13.3", "fp16", True, (), True),
        ("11.0.0", "fp16", True, (), True),
    ],
)
def test_build_plan_per_version(version, precision, strongly_typed, flags, fp16_onnx):
    plan = trt_engine.build_plan(version, precision)
    assert (plan.strongly_typed, plan.flags, plan.fp16_onnx) == (strongly_typed, flags, fp16_onnx)
    # From 10.x on, FP16 and INT8 go through the same strongly typed network: the weakly typed precision flags
    # are deprecated since 10.12 and removed in 11, so no plan may ask for one there.
    if plan.version >= (10, 0):
        assert plan.flags == () and plan.strongly_typed


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


def _ort_run(model_or_path, images):
    import onnxruntime as ort

    source = model_or_path.SerializeToString() if hasattr(model_or_path, "SerializeToString") else str(model_or_path)
    session = ort.InferenceSession(source, providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: images})[0]


def test_fp16_conversion_of_an_exported_repvgg_runs_like_fp32_in_onnxruntime(tmp_path):
    import onnx
    import torch
    from onnx import TensorProto

    from repq.engines.export import export_float
    from repq.reparam import create_model, fuse_model

    torch.manual_seed(0)
    model = fuse_model(create_model("repvgg_a0", num_classes=10, cifar=True, width_mult=0.25)).eval()
    fp32 = tmp_path / "model_fp32.onnx"
    fp32.write_bytes(export_float(model, (1, 3, 32, 32), 17, True).SerializeToString())
    out = trt_engine.write_fp16_onnx(fp32, tmp_path / "model_fp32.fp16.onnx")
    converted = onnx.load(str(out))
    graph = converted.graph
    # float32 at the interface, float16 inside: casts at both ends, every weight in FP16.
    assert graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT
    assert graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT
    assert (graph.node[0].op_type, graph.node[-1].op_type) == ("Cast", "Cast")
    kinds = {init.data_type for init in graph.initializer}
    assert kinds == {TensorProto.FLOAT16}
    images = np.random.default_rng(0).standard_normal((8, 3, 32, 32)).astype(np.float32)
    with torch.no_grad():
        expected = model(torch.from_numpy(images)).numpy()
    got = _ort_run(out, images)
    error = np.abs(got - expected).max() / np.abs(expected).max()
    # FP16 weights change the function a little (so the conversion happened), far below the logits' scale.
    assert 0 < error < 1e-2, error
    assert (got.argmax(1) == expected.argmax(1)).all()


def test_fp16_conversion_handles_constants_casts_and_resize_scales():
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    # y = Resize(x * c + Cast(int_one), scales) ; c a Constant node, scales a float32-only Resize input.
    nodes = [
        helper.make_node("Constant", [], ["c"], value=numpy_helper.from_array(np.float32(1.5).reshape(()))),
        helper.make_node("Constant", [], ["k"], value_float=0.25),
        helper.make_node("Cast", ["one"], ["one_f"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["x", "c"], ["xc"]),
        helper.make_node("Add", ["xc", "one_f"], ["xa"]),
        helper.make_node("Sub", ["xa", "k"], ["xs"]),
        helper.make_node("Resize", ["xs", "", "scales"], ["y"], mode="nearest"),
    ]
    inits = [numpy_helper.from_array(np.array(1, np.int64), "one"),
             numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 2, 3, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 2, 6, 6])], inits,
                              value_info=[helper.make_tensor_value_info("xc", TensorProto.FLOAT, ["n", 2, 3, 3])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    converted = trt_engine.convert_to_fp16(model)
    by_name = {init.name: init.data_type for init in converted.graph.initializer}
    assert by_name == {"one": TensorProto.INT64, "scales": TensorProto.FLOAT}  # Resize's scales stay float32
    casts = [n for n in converted.graph.node if n.op_type == "Cast" and n.input[0] == "one"]
    assert casts[0].attribute[0].i == TensorProto.FLOAT16
    assert converted.graph.value_info[0].type.tensor_type.elem_type == TensorProto.FLOAT16
    x = np.random.default_rng(1).uniform(-2, 2, (2, 2, 3, 3)).astype(np.float32)
    expected = np.repeat(np.repeat(x * 1.5 + 1 - 0.25, 2, axis=2), 2, axis=3)  # by hand
    np.testing.assert_allclose(_ort_run(converted, x), expected, rtol=2e-3, atol=2e-3)
    onnx.checker.check_model(converted, full_check=True)


def test_fp16_conversion_refuses_qdq_files(tmp_path):
    import onnx
    from test_openvino import build_net

    qdq = onnx.load(str(build_net(tmp_path / "qdq.onnx", quantized=True)))
    with pytest.raises(RepqError, match="Q/DQ nodes"):
        trt_engine.convert_to_fp16(qdq)


# ---------------------------------------------------------------- plans beside the ONNX file, I/O dtypes


def test_every_tensorrt_io_type_maps_to_the_torch_dtype_of_the_same_width_and_kind():
    import torch

    widths = {"FLOAT": 4, "HALF": 2, "BF16": 2, "INT8": 1, "UINT8": 1, "INT32": 4, "INT64": 8, "BOOL": 1}
    assert set(trt_engine.TRT_TORCH_DTYPES) == set(widths)
    for member, name in trt_engine.TRT_TORCH_DTYPES.items():
        dtype = getattr(torch, name)
        assert torch.empty(0, dtype=dtype).element_size() == widths[member], member
        assert dtype.is_floating_point == (member in ("FLOAT", "HALF", "BF16")), member
    assert torch.finfo(torch.bfloat16).bits == 16 and torch.finfo(torch.float16).max == 65504

    class FakeDataType:  # a TensorRT 8.6 without BF16 and INT64: the map keeps the types it has
        FLOAT, HALF, INT8, UINT8, INT32, BOOL = range(6)

    class FakeTrt:
        DataType = FakeDataType

    mapped = trt_engine.torch_dtypes(FakeTrt)
    assert mapped[FakeDataType.HALF] is torch.float16 and len(mapped) == 6


def test_plan_paths_precision_and_freshness(tmp_path):
    import json
    import os

    from test_openvino import build_net

    qdq = build_net(tmp_path / "net.trt.onnx", quantized=True)
    fp32 = build_net(tmp_path / "net_fp32.onnx", quantized=False)
    assert trt_engine.plan_path(qdq, "int8") == tmp_path / "net.trt.int8.plan"
    assert trt_engine.plan_path(fp32, "fp16", tmp_path / "engine") == tmp_path / "engine" / "net_fp32.fp16.plan"
    assert trt_engine.resolve_precision(qdq, None) == "int8" and trt_engine.resolve_precision(fp32, None) == "fp16"
    with pytest.raises(RepqError, match="no Q/DQ nodes"):
        trt_engine.resolve_precision(fp32, "int8")
    with pytest.raises(RepqError, match="QDQ"):
        trt_engine.resolve_precision(qdq, "fp16")

    plan = trt_engine.plan_path(qdq, "int8")
    assert trt_engine.plan_rebuild_reason(qdq, plan, [1, 8], "10.8.0") == "no plan yet"
    plan.write_bytes(b"engine")
    assert "no build record" in trt_engine.plan_rebuild_reason(qdq, plan, [1, 8], "10.8.0")
    record = {"trt_version": "10.8.0", "onnx": str(qdq), "profile": {"min": [1, 3, 12, 12], "max": [8, 3, 12, 12]}}
    (tmp_path / "net.trt.int8.plan.build.json").write_text(json.dumps(record))
    assert trt_engine.plan_rebuild_reason(qdq, plan, [1, 8], "10.8.0") is None
    assert "TensorRT 10.8.0" in trt_engine.plan_rebuild_reason(qdq, plan, [1, 8], "10.9.0")
    assert "batches 1..8" in trt_engine.plan_rebuild_reason(qdq, plan, [1, 32], "10.8.0")
    later = plan.stat().st_mtime + 10
    os.utime(qdq, (later, later))  # the ONNX file changed after the build
    assert "newer than the plan" in trt_engine.plan_rebuild_reason(qdq, plan, [1, 8], "10.8.0")
    assert trt_engine.source_onnx(plan) == qdq
    (tmp_path / "net.trt.int8.plan.build.json").unlink()
    assert trt_engine.source_onnx(plan) == qdq  # from the plan's name alone
