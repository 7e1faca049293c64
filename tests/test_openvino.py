"""OpenVINO engine: the TensorRT-placement QDQ graph runs in INT8 on the CPU and agrees with ONNX Runtime."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from repq.engines.openvino import (
    INT8_PROBE_TOLERANCE,
    OpenVinoEngine,
    int8_coverage,
    int8_kernel_error,
    openvino_available,
    openvino_int8_problem,
)
from repq.errors import RepqError

pytestmark = pytest.mark.skipif(openvino_available() is not None, reason=str(openvino_available()))


def _int8_problem() -> str | None:
    return None if openvino_available() else openvino_int8_problem()


# OpenVINO refuses INT8 files on CPUs whose INT8 kernels it computes inexactly (AVX2 without VNNI).
exact_int8 = pytest.mark.skipif(_int8_problem() is not None, reason=str(_int8_problem()))


def _qdq(graph_nodes, inits, name, tensor, scale, axis=None):
    """Append Q -> DQ (symmetric int8, zero point 0) on `tensor`; return the dequantized name."""
    scale = np.asarray(scale, dtype=np.float32)
    inits += [
        numpy_helper.from_array(scale, f"{name}_scale"),
        numpy_helper.from_array(np.zeros(scale.shape, np.int8), f"{name}_zp"),
    ]
    kwargs = {} if axis is None else {"axis": axis}
    graph_nodes.append(
        helper.make_node("QuantizeLinear", [tensor, f"{name}_scale", f"{name}_zp"], [f"{name}_q"], **kwargs)
    )
    graph_nodes.append(
        helper.make_node(
            "DequantizeLinear", [f"{name}_q", f"{name}_scale", f"{name}_zp"], [f"{name}_dq"], **kwargs
        )
    )
    return f"{name}_dq"


def build_net(path, quantized: bool, seed: int = 0, classes: int = 5):
    """conv-relu-conv-relu-GAP-FC with TensorRT placement (Q/DQ on every conv/FC input and weight) or none."""
    rng = np.random.default_rng(seed)
    w1 = rng.normal(0, 0.3, (8, 3, 3, 3)).astype(np.float32)
    b1 = rng.normal(0, 0.1, 8).astype(np.float32)
    w2 = rng.normal(0, 0.2, (16, 8, 3, 3)).astype(np.float32)
    b2 = rng.normal(0, 0.1, 16).astype(np.float32)
    wf = rng.normal(0, 0.3, (classes, 16)).astype(np.float32)
    bf = rng.normal(0, 0.1, classes).astype(np.float32)
    inits = [
        numpy_helper.from_array(a, n)
        for a, n in [(w1, "w1"), (b1, "b1"), (w2, "w2"), (b2, "b2"), (wf, "wf"), (bf, "bf")]
    ]
    nodes = []

    def q(name, tensor, scale, axis=None):
        return _qdq(nodes, inits, name, tensor, scale, axis) if quantized else tensor

    def wscale(w):
        return np.abs(w.reshape(w.shape[0], -1)).max(axis=1) / 127.0

    x = q("x", "input", 3.0 / 127)
    nodes.append(
        helper.make_node("Conv", [x, q("w1q", "w1", wscale(w1), 0), "b1"], ["c1"], pads=[1, 1, 1, 1])
    )
    nodes.append(helper.make_node("Relu", ["c1"], ["r1"]))
    nodes.append(
        helper.make_node(
            "Conv", [q("a1", "r1", 2.0 / 127), q("w2q", "w2", wscale(w2), 0), "b2"], ["c2"], pads=[1, 1, 1, 1]
        )
    )
    nodes.append(helper.make_node("Relu", ["c2"], ["r2"]))
    nodes.append(helper.make_node("GlobalAveragePool", ["r2"], ["gap"]))
    nodes.append(helper.make_node("Flatten", ["gap"], ["flat"]))
    nodes.append(
        helper.make_node(
            "Gemm", [q("a2", "flat", 1.5 / 127), q("wfq", "wf", wscale(wf), 0), "bf"], ["logits"], transB=1
        )
    )
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, 12, 12])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", classes])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path


def ort_reference(path, x):
    """ONNX Runtime with graph optimizations off: the ONNX operator semantics, computed independently."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return session.run(None, {"input": x})[0]


@pytest.fixture(scope="module")
def nets(tmp_path_factory):
    root = tmp_path_factory.mktemp("ov")
    return {"qdq": build_net(root / "qdq.onnx", True), "fp32": build_net(root / "fp32.onnx", False)}


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(1).uniform(-2.5, 2.5, (6, 3, 12, 12)).astype(np.float32)


def test_fp32_engine_matches_onnxruntime(nets, images):
    engine = OpenVinoEngine(nets["fp32"], threads=1, precision_hint="f32")
    assert str(engine.compiled_property("INFERENCE_PRECISION_HINT")) == "<Type: 'float32'>"
    assert int(engine.compiled_property("INFERENCE_NUM_THREADS")) == 1
    np.testing.assert_allclose(engine(images), ort_reference(nets["fp32"], images), rtol=1e-4, atol=1e-5)
    coverage = engine.int8_coverage()
    assert coverage["compute_layers"] == 3 and coverage["int8_layers"] == 0


@exact_int8
def test_qdq_graph_runs_in_int8_and_matches_onnxruntime(nets, images):
    engine = OpenVinoEngine(nets["qdq"], threads=1)
    coverage = engine.int8_coverage()
    assert coverage["compute_layers"] == 3, engine.layer_precisions()
    assert coverage["int8_layers"] == 3 and coverage["fallback"] == []
    out, ref = engine(images), ort_reference(nets["qdq"], images)
    # INT8 convs accumulate exactly: only a requantization tie rounded the other way may differ by a step,
    # far less than the quantization error itself (the gap to the float network with the same weights).
    float_gap = np.abs(out - ort_reference(nets["fp32"], images)).max()
    assert np.abs(out - ref).max() <= 0.02 * np.abs(ref).max()
    assert np.abs(out - ref).max() < 0.05 * float_gap
    assert (out.argmax(1) == ref.argmax(1)).mean() >= 5 / 6


@exact_int8
def test_static_batch_benchmark_and_accuracy(nets, images):
    engine = OpenVinoEngine(nets["qdq"], threads=1, batch_size=3)
    assert engine.input_shape == (3, 3, 12, 12)
    (stats,) = engine.benchmark((3, 12, 12), warmup=1, runs=5)
    assert stats.batch_size == 3 and stats.runs == 5 and stats.median_ms > 0
    labels = ort_reference(nets["qdq"], images).argmax(1)
    accuracy = engine.evaluate([(images[:3], labels[:3]), (images[3:], labels[3:])])
    assert accuracy["images"] == 6 and accuracy["top1"] >= 100 * 5 / 6
    with pytest.raises(RepqError, match="compiled for batch 3"):
        engine.benchmark((3, 12, 12), [4], warmup=0, runs=1)


def test_dynamic_batch_engine_benchmarks_growing_batches_after_evaluating(nets, images):
    """The bench stage's order on a dynamic-batch file: score it, then time batch 1 and batch 32. The timed runs
    share their input array with an infer request, which OpenVINO then cannot grow to a larger batch ("Could set
    new shape: [32,3,12,12]" killed `repq run` with the openvino target)."""
    engine = OpenVinoEngine(nets["fp32"], threads=1)
    labels = ort_reference(nets["fp32"], images).argmax(1)
    assert engine.evaluate([(images[:4], labels[:4])])["top1"] == 100.0
    stats = engine.benchmark((3, 12, 12), [1, 32, 2], warmup=1, runs=3)
    assert [s.batch_size for s in stats] == [1, 32, 2] and all(s.runs == 3 and s.median_ms > 0 for s in stats)
    big = np.concatenate([images] * 7)  # 42 images: the engine itself still runs any batch, correctly
    np.testing.assert_allclose(engine(big), ort_reference(nets["fp32"], big), rtol=1e-4, atol=1e-5)


def test_availability_is_asked_per_file(nets, monkeypatch):
    import repq.engines.openvino
    from repq.engines.openvino import openvino_unavailable_reason

    monkeypatch.setattr(repq.engines.openvino, "openvino_int8_problem", lambda: "inexact INT8 kernels here")
    assert openvino_unavailable_reason(nets["qdq"]) == "inexact INT8 kernels here"
    assert openvino_unavailable_reason(nets["fp32"]) is None and openvino_unavailable_reason() is None


def test_coverage_names_fallback_layers():
    from repq.engines.openvino import LayerPrecision

    layers = [
        LayerPrecision("conv1", "Convolution", "u8", ("a",)),
        LayerPrecision("fc", "FullyConnected", "f32", ()),
        LayerPrecision("pool", "Reduce", "f32", ()),
    ]
    coverage = int8_coverage(layers)
    assert coverage["compute_layers"] == 2 and coverage["int8_layers"] == 1
    assert coverage["fallback"] == [{"name": "fc", "type": "FullyConnected", "precision": "f32"}]


def test_bad_files_give_one_line_errors(tmp_path):
    with pytest.raises(RepqError, match="does not exist"):
        OpenVinoEngine(tmp_path / "missing.onnx")
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"not an onnx file")
    with pytest.raises(RepqError, match="cannot read"):
        OpenVinoEngine(garbage)


@exact_int8
def test_exported_tensorrt_graph_runs_int8_and_matches_fake_quant(tmp_path):
    """The real path: ModelOpt calibration -> export for the `openvino` target -> OpenVINO."""
    import torch

    from repq.engines.export import export_onnx
    from repq.engines.targets import get_target
    from repq.quant.toolkit import quantize

    assert get_target("openvino").placement == get_target("tensorrt").placement == "tensorrt"
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.Conv2d(8, 16, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(16, 5),
    ).eval()
    calib = [(torch.randn(8, 3, 12, 12), torch.zeros(8)) for _ in range(2)]
    quantized = quantize(net, calib, method="max", fuse=False)
    path = export_onnx(
        quantized, tmp_path / "net.onnx", target="openvino", input_shape=(1, 3, 12, 12), dynamic_batch=True
    )
    engine = OpenVinoEngine(path, threads=1)
    coverage = engine.int8_coverage()
    assert coverage["compute_layers"] == 3 and coverage["int8_layers"] == 3, engine.layer_precisions()
    x = torch.randn(5, 3, 12, 12)
    with torch.no_grad():
        fake_quant, fp32 = quantized(x).numpy(), net(x).numpy()
    out = engine(x.numpy())
    # The engine reproduces the fake-quant model far more closely than the float model it was made from.
    assert np.abs(out - fake_quant).max() < 0.25 * np.abs(out - fp32).max() + 1e-4
    assert np.abs(out - fake_quant).max() <= 0.02 * np.abs(fake_quant).max()


def test_int8_probe_is_exact_for_7_bit_weight_codes_on_every_cpu():
    """The probe's reference is right: 7-bit codes run exactly even where 8-bit ones do not."""
    assert int8_kernel_error(63) <= INT8_PROBE_TOLERANCE


def test_int8_files_are_refused_where_the_int8_kernels_are_inexact(nets, images, monkeypatch):
    import repq.engines.openvino

    monkeypatch.setattr(repq.engines.openvino, "openvino_int8_problem", lambda: "inexact INT8 kernels here")
    with pytest.raises(RepqError, match="qdq.onnx: inexact INT8 kernels here"):
        OpenVinoEngine(nets["qdq"], threads=1)
    engine = OpenVinoEngine(nets["fp32"], threads=1)  # float files still run
    np.testing.assert_allclose(engine(images), ort_reference(nets["fp32"], images), rtol=1e-4, atol=1e-5)
